/* assert() in kernel code: a failed assertion stops the launch and raises a Python exception
 * naming the condition, the line, the block and the thread (instead of aborting the interpreter).
 * No include guard, like the standard <assert.h>: every inclusion re-reads NDEBUG. */
#include "emu_abi.h"
#undef assert
#ifdef NDEBUG
#define assert(e) ((void)0)
#else
#define assert(e) ((e) ? (void)0 : __emu_kernel_fail("assertion `" #e "' failed", __FILE__, __LINE__, __func__))
#endif
