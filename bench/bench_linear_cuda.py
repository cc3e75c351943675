"""Weight-only quantized linear on a CUDA GPU against fp16 F.linear (cuBLAS), tinygemm and ATen's
int8 kernel (the benchmark lives in linquant.benchmark_cuda so that `linquant bench-cuda` runs it
too). `python bench/bench_linear_cuda.py --help` lists the options."""

import sys

from linquant.benchmark_cuda import main

if __name__ == "__main__":
    sys.exit(main())
