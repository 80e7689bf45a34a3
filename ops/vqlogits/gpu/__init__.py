"""GPU kernels of the fused VQLogits op (Triton). Installed as ``vqexport._ops_gpu``; see ops/vqlogits/README.md."""
