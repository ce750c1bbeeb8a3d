/* The emulator's <assert.h>: found before the system one (-I), see emu_assert.h. */
#include "emu_assert.h"
