/* The emulator's <device_launch_parameters.h>: threadIdx & co. are in cuda_emu.h. */
#include "cuda_emu.h"
