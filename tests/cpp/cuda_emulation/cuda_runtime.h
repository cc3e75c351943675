// Host emulation of CUDA (see cuda_emulation.h): found before the toolkit's headers in place of cuda_runtime.h.
#pragma once
#include "cuda_emulation.h"
