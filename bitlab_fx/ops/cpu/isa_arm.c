/* isa_arm.c: which ARM64 path the CPU can run (bitlab_best_isa asks here): NEON (ASIMD, every ARM64 CPU) or
 * NEON with the ARMv8.2 dot-product instructions sdot/udot (FEAT_DotProd: Apple M1 and later, Graviton 2+,
 * Ampere Altra, Neoverse N1/V1/N2/V2, Cortex-A55/A76 and later). Linux: getauxval(AT_HWCAP) & HWCAP_ASIMDDP;
 * macOS: sysctlbyname("hw.optional.arm.FEAT_DotProd"); elsewhere NEON. ARM64 only. */
#include "bitlab_cpu.h"

#ifdef BITLAB_ARM
#if defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1UL << 20) /* the kernel's bit for FEAT_DotProd (arch/arm64/include/uapi/asm/hwcap.h) */
#endif
#elif defined(__APPLE__)
#include <sys/sysctl.h>
#endif

BITLAB_INTERNAL int bitlab_arm_best_isa(void) {
#if defined(__linux__)
    return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) ? ISA_DOTPROD : ISA_NEON;
#elif defined(__APPLE__)
    int has = 0;
    size_t len = sizeof has;
    if (sysctlbyname("hw.optional.arm.FEAT_DotProd", &has, &len, NULL, 0) == 0 && has) return ISA_DOTPROD;
    return ISA_NEON;
#else
    return ISA_NEON;
#endif
}
#endif /* BITLAB_ARM */
