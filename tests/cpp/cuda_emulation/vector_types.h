// Host emulation of CUDA (see cuda_emulation.h): found before the toolkit's headers.
#pragma once
#include "cuda_emulation.h"
