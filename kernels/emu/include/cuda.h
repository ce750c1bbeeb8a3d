/* The emulator's <cuda.h>: everything a kernel needs is already in cuda_emu.h. */
#include "cuda_emu.h"
