"""Weight-only quantized linear on the CPU against fp32 / bf16 F.linear, ATen's int8 / int4 kernels
and optimum-quanto / torchao (the benchmark lives in linquant.benchmark so that `linquant bench`
runs it too). `python bench/bench_linear.py --help` lists the options."""

from linquant.benchmark import main

if __name__ == "__main__":
    main()
