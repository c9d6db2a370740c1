#!/bin/sh
# Starts one ditserve service of a LeaderWorkerSet group: `entrypoint.sh SUBCOMMAND [ARGS...]`.
# The group's config is the shared template with "{group}" replaced by this pod's group index,
# and a stage's index is its worker index minus one (worker 0 is the leader). Both indices
# come from the pod's LWS labels through the downward API (DITSERVE_GROUP_INDEX,
# DITSERVE_WORKER_INDEX); nothing here is baked into the image.
set -eu
template="${DITSERVE_CONFIG_TEMPLATE:-/etc/ditserve/pipeline.yaml}"
config="${TMPDIR:-/tmp}/ditserve-$1.yaml"  # one per container: the leader runs two
sed "s/{group}/${DITSERVE_GROUP_INDEX}/g" "$template" > "$config"
if [ "$1" = stage ]; then
  DITSERVE_STAGE_INDEX=$((DITSERVE_WORKER_INDEX - 1))
  export DITSERVE_STAGE_INDEX
fi
DITSERVE_CONFIG="$config"
export DITSERVE_CONFIG
exec ditserve "$@" --config "$config"
