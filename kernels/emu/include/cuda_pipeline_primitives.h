/* The emulator's <cuda_pipeline_primitives.h>: the primitives are in cuda_pipeline.h. */
#include "cuda_pipeline.h"
