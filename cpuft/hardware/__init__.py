"""What this machine is: the probe (`Machine`), datasheet peak FLOP/s per CPU kind and GPU, and
measured GEMM throughput. The only layer that looks at hardware; everything above reads `Machine`.
"""
