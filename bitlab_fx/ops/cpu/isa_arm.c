/* isa_arm.c: which ARM64 path the CPU can run (bitlab_best_isa asks here): NEON (ASIMD, every ARM64 CPU); NEON
 * with the ARMv8.2 dot-product instructions sdot/udot (FEAT_DotProd: Apple M1 and later, Graviton 2+, Ampere
 * Altra, Neoverse N1/V1/N2/V2, Cortex-A55/A76 and later); or also the int8 matrix multiply smmla (FEAT_I8MM:
 * Apple M2 and later, Graviton 3/4, Neoverse V1/V2/N2). Linux: getauxval(AT_HWCAP) & HWCAP_ASIMDDP,
 * getauxval(AT_HWCAP2) & HWCAP2_I8MM; macOS: sysctlbyname("hw.optional.arm.FEAT_DotProd" / "FEAT_I8MM");
 * elsewhere NEON. ARM64 only. */
#include "bitlab_cpu.h"

#ifdef BITLAB_ARM
#if defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1UL << 20) /* the kernel's bit for FEAT_DotProd (arch/arm64/include/uapi/asm/hwcap.h) */
#endif
#ifndef HWCAP2_I8MM
#define HWCAP2_I8MM (1UL << 13)
#endif
#elif defined(__APPLE__)
#include <sys/sysctl.h>
#endif

#ifdef __APPLE__
static int has_feature(const char *name) {
    int has = 0;
    size_t len = sizeof has;
    return sysctlbyname(name, &has, &len, NULL, 0) == 0 && has;
}
#endif

BITLAB_INTERNAL int bitlab_arm_best_isa(void) {
#if defined(__linux__)
    if (!(getauxval(AT_HWCAP) & HWCAP_ASIMDDP)) return ISA_NEON;
    return (getauxval(AT_HWCAP2) & HWCAP2_I8MM) ? ISA_I8MM : ISA_DOTPROD;
#elif defined(__APPLE__)
    if (!has_feature("hw.optional.arm.FEAT_DotProd")) return ISA_NEON;
    return has_feature("hw.optional.arm.FEAT_I8MM") ? ISA_I8MM : ISA_DOTPROD;
#else
    return ISA_NEON;
#endif
}
#endif /* BITLAB_ARM */
