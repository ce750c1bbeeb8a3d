/*
 * emu_entry.h: appended (by kernels/emu/emulator.py) after a kernel source, to export each
 * extern "C" __global__ function to the runtime.
 *
 * For a kernel `void scale(float* x, float a, int n)` it generates
 *   __emu_entry_scale(void** args)  ->  scale(*(float**)args[0], *(float*)args[1], *(int*)args[2])
 * which is exactly how cuLaunchKernel reads its `kernelParams`: an array of pointers to the
 * argument values.  The parameter types come from the function's own type, so the unpacking
 * is right by construction.  __emu_sig_scale() returns "P4,S4,S4,": what Python cross-checks.
 * In sanitized builds this glue is not instrumented: reading the argument list is not the
 * kernel's doing (the kernel itself still is).
 */
#ifndef KERNELS_EMU_ENTRY_H
#define KERNELS_EMU_ENTRY_H

#include <string>
#include <type_traits>
#include <utility>

#ifdef __KERNELS_EMU_SANITIZE__
#define EMU_GLUE __attribute__((no_sanitize_thread))
#else
#define EMU_GLUE   /* (the attribute would also keep the kernel from being inlined here) */
#endif

namespace emu {
template <class T> struct pointee_size { static constexpr size_t value = sizeof(T); };
template <> struct pointee_size<void> { static constexpr size_t value = 0; };
template <> struct pointee_size<const void> { static constexpr size_t value = 0; };
template <> struct pointee_size<volatile void> { static constexpr size_t value = 0; };
template <> struct pointee_size<const volatile void> { static constexpr size_t value = 0; };

template <class A>
EMU_GLUE static void append_param(std::string& s) {
    typedef typename std::remove_cv<typename std::remove_reference<A>::type>::type U;
    if (std::is_pointer<U>::value) {
        s += 'P';
        s += std::to_string(pointee_size<typename std::remove_pointer<U>::type>::value);
    } else {
        s += 'S';
        s += std::to_string(sizeof(U));
    }
    s += ',';
}

template <class... A, size_t... I>
EMU_GLUE static inline void invoke_impl(void (*f)(A...), void** args, std::index_sequence<I...>) {
    f(*static_cast<typename std::remove_cv<typename std::remove_reference<A>::type>::type*>(args[I])...);
}
template <class... A>
EMU_GLUE static inline void invoke(void (*f)(A...), void** args) {
    invoke_impl(f, args, std::index_sequence_for<A...>{});
}
template <class... A>
EMU_GLUE static inline const char* signature(void (*)(A...)) {
    static const std::string s = []() EMU_GLUE {
        std::string r;
        int dummy[] = {0, (append_param<A>(r), 0)...};
        (void)dummy;
        return r;
    }();
    return s.c_str();
}
}  // namespace emu

extern "C" {
extern unsigned char __start_emu_shared[] __attribute__((weak, visibility("hidden")));
extern unsigned char __stop_emu_shared[] __attribute__((weak, visibility("hidden")));
__attribute__((visibility("default"))) EMU_GLUE void __emu_static_shared_range(void** lo, void** hi) {
    *lo = __start_emu_shared;
    *hi = __stop_emu_shared;
}
}

/* Braces matter: `extern "C" T x[n];` would only declare x. */
#define EMU_DYNAMIC_SHARED_BUFFER(n) \
    extern "C" { __attribute__((visibility("default"), aligned(256))) unsigned char __emu_dynamic_shared[(n) > 0 ? (n) : 1]; }

#define EMU_EXPORT_KERNEL(name)                                                                     \
    extern "C" __attribute__((visibility("default"))) EMU_GLUE void __emu_entry_##name(void** args) { \
        ::emu::invoke(&name, args);                                                                 \
    }                                                                                               \
    extern "C" __attribute__((visibility("default"))) EMU_GLUE const char* __emu_sig_##name(void) { \
        return ::emu::signature(&name);                                                             \
    }

#endif /* KERNELS_EMU_ENTRY_H */
