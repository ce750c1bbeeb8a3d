/* The emulator's <cuda_runtime.h>: everything a kernel needs is already in cuda_emu.h. */
#include "cuda_emu.h"
