"""The launcher's supervisor on its own: restart backoff that resets after a healthy run,
and stopping services of which some never started (issue 11 §2); liveness probes (issue 14)."""

from __future__ import annotations

import sys

from ditserve.common.process import failure_cause
from ditserve.common.segments import SHM_DIR
from ditserve.launcher.plan import ServiceSpec
from ditserve.launcher.supervisor import LivenessProbe, RestartBackoff, Supervisor


def _spec(name: str, code: str = "pass") -> ServiceSpec:
    return ServiceSpec(name, (sys.executable, "-c", code), "127.0.0.1:1", "127.0.0.1:1", 0)


def test_backoff_doubles_while_a_service_keeps_crashing():
    backoff = RestartBackoff(cap=30.0, reset_after=10.0)
    assert [backoff.on_exit(ran_for=0.5) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]


def test_backoff_resets_after_a_healthy_run():
    backoff = RestartBackoff(cap=30.0, reset_after=10.0)
    assert [backoff.on_exit(ran_for=0.5) for _ in range(3)] == [1, 2, 4]
    assert backoff.on_exit(ran_for=30.0) == 1
    assert backoff.on_exit(ran_for=0.5) == 2


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_service_killed_after_healthy_runs_restarts_after_one_second(tmp_path):
    """The issue's case: killed four times, each after 30 s of running: 1, 1, 1, 1 s
    (it was 1, 2, 4, 8)."""
    clock = _Clock()
    supervisor = Supervisor([_spec("stage-0")], tmp_path, clock=clock)
    service = supervisor.services[0]
    service.start(clock())
    delays = []
    for _ in range(4):
        service.process.proc.wait()
        clock.now += 30.0  # it ran 30 s before it died
        supervisor.supervise_once()  # notices the exit, schedules the restart
        delays.append(service.next_restart - clock.now)
        clock.now = service.next_restart
        supervisor.supervise_once()  # restarts it
        assert service.next_restart is None
    supervisor.stop_all()
    assert delays == [1.0, 1.0, 1.0, 1.0] and service.restarts == 4


def test_stop_all_with_services_never_started(tmp_path):
    """A start-up failure stops the services that did start; the others have no process
    (this was `AttributeError: 'NoneType' object has no attribute 'send_signal'`)."""
    supervisor = Supervisor([_spec("stage-1", "import time; time.sleep(60)"), _spec("stage-0")],
                            tmp_path)
    running = supervisor.services[0]
    running.start(0.0)
    supervisor.stop_all()
    assert running.process.exited() is not None
    assert supervisor.services[1].process.proc is None


def test_failure_cause_is_the_services_own_last_word():
    tail = ["ts=... event=listening", "Traceback (most recent call last):",
            '  File "x.py", line 1', "OSError: VAE folder is broken"]
    assert failure_cause(1, tail) == "exit code 1: OSError: VAE folder is broken"
    assert failure_cause(2, ["ditserve decoder: no config.json"]) == (
        "exit code 2: ditserve decoder: no config.json")
    assert failure_cause(-9, []) == "killed by SIGKILL"
    echo = ["OSError: the real cause", "Exception ignored in: <function Server.__del__>",
            "RuntimeError: Event loop is closed"]
    assert failure_cause(1, echo) == "exit code 1: OSError: the real cause"
    quoting = ["ditserve up: decoder failed to start: exit code 1: OSError: bad VAE",
               "  last lines of decoder.log:", "    OSError: bad VAE"]
    assert failure_cause(2, quoting) == f"exit code 2: {quoting[0]}"


def _running(tmp_path, clock, probe: LivenessProbe):
    """A supervisor of one long-running service that has served (probes apply)."""
    supervisor = Supervisor([_spec("stage-1", "import time; time.sleep(60)")], tmp_path,
                            clock=clock, liveness=probe)
    service = supervisor.services[0]
    service.start(clock())
    service.serving = True
    return supervisor, service


def test_a_service_that_stops_answering_is_killed_and_restarted(tmp_path, caplog):
    clock = _Clock()
    supervisor, service = _running(tmp_path, clock, LivenessProbe(2.0, 0.1, 3))
    service.process.answers = lambda timeout: False  # frozen (SIGSTOP): no answer
    first_pid = service.process.pid
    for _ in range(2):
        supervisor.supervise_once()
        clock.now += 1.0
        supervisor.supervise_once()  # not due yet: one probe per period
        clock.now += 1.0
    assert service.process.running() and service.missed == 2
    supervisor.supervise_once()
    assert service.process.exited() == -9 and service.missed == 3
    supervisor.supervise_once()  # sees the exit
    clock.now = service.next_restart
    supervisor.supervise_once()  # restarts it
    assert service.process.running() and service.process.pid != first_pid
    assert service.restarts == 1 and service.missed == 0 and not service.serving
    supervisor.stop_all()
    assert "did not answer 3 health checks in a row" in caplog.text


def test_an_answer_resets_the_count_and_not_serving_is_an_answer(tmp_path):
    clock = _Clock()
    supervisor, service = _running(tmp_path, clock, LivenessProbe(1.0, 0.1, 2))
    answers = iter([False, True, False, True, False, True])
    service.process.answers = lambda timeout: next(answers)
    for _ in range(6):
        supervisor.supervise_once()
        clock.now += 1.0
    assert service.process.running() and service.restarts == 0
    supervisor.stop_all()


def test_a_restarted_service_is_not_probed_while_it_starts(tmp_path):
    clock = _Clock()
    supervisor, service = _running(tmp_path, clock, LivenessProbe(1.0, 0.1, 1))
    service.serving = False  # loading weights again
    service.process.serving = lambda timeout: False
    service.process.answers = lambda timeout: False
    for _ in range(5):
        supervisor.supervise_once()
        clock.now += 1.0
    assert service.process.running()
    service.process.serving = lambda timeout: True
    supervisor.supervise_once()
    assert service.serving
    clock.now += 1.0
    supervisor.supervise_once()
    assert service.process.exited() == -9
    supervisor.stop_all()


def test_no_liveness_probe_probes_nothing(tmp_path):
    clock = _Clock()
    supervisor, service = _running(tmp_path, clock, None)
    service.process.answers = lambda timeout: 1 / 0
    for _ in range(3):
        supervisor.supervise_once()
        clock.now += 5.0
    assert service.process.running()
    supervisor.stop_all()


def test_a_killed_services_unmapped_segment_is_removed_when_it_is_restarted(tmp_path):
    """A stage SIGKILLed between creating its ring and the peer's mapping leaves the name in
    /dev/shm; the supervisor that reaps it removes it (by the pid in the name)."""
    code = ("import os; from ditserve.wire.shm import ShmRing; ShmRing(4096, 1); "
            "os.kill(os.getpid(), 9)")
    clock = _Clock()
    supervisor = Supervisor([_spec("stage-0", code)], tmp_path, clock=clock)
    service = supervisor.services[0]
    service.start(clock())
    service.process.proc.wait()
    pid = service.process.pid
    assert list(SHM_DIR.glob(f"ditserve-{pid}-*"))  # left behind by the kill
    supervisor.supervise_once()  # notices the exit
    assert not list(SHM_DIR.glob(f"ditserve-{pid}-*"))
    supervisor.stop_all()
