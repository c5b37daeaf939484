"""Host memory of an infer job, measured on a CPU by benchmarks/bench_infer_memory.py (fp32, plain_unet width 16
and LinkNet/ResNet-18): C + a·P + batch_planes·(p·P + m·N), P the padded pixels, N the frame's.

One home for two readers: the workflow declares an infer job's memory by these figures (holopipe.run.resources),
and the job sizes its plane batches to that memory by the same ones (holopipe.detect.infer.infer_memory). Free of
torch, so that the workflow reads them at parse time without importing it.
"""

INFER_LIBRARIES_BYTES = 1100 * 2**20
"""C: torch and the model."""
INFER_BYTES_PER_PADDED_PIXEL = 40
"""a: the hologram's spectrum and transfer function, once."""
INFER_BYTES_PER_PADDED_PIXEL_PLANE = 30
"""p: per plane of a batch, the propagated field and its amplitude and phase."""
INFER_CPU_BYTES_PER_PIXEL_PLANE = 470
"""m on a CPU: per frame pixel per plane of a batch, the model's activations (470 B measured; a full HOLODEC
frame needs 9.3 GB per plane)."""
INFER_GPU_HOST_BYTES_PER_PIXEL_PLANE = 8
"""m on a GPU: the activations stay in the GPU's memory, and the host receives the plane's probability and
amplitude (8 B, assumed)."""
