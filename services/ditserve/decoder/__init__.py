"""The decoder service: final DiT latents → images with the Stable Diffusion VAE.

decoder.py (the VAE, no gRPC) ← batching.py (concurrent requests, one compute thread)
← servicer.py (DecoderService.Decode) ← server.py (lifecycle); client.py is the
coordinator's side of the call.
"""
