/* Run a process as if its x86-64 CPU lacked some vector extensions (LD_PRELOAD this library).

   Which kernels ONNX Runtime's MLAS (and NumPy) run is decided by the CPUID instruction. Linux can
   make CPUID fault in user space (arch_prctl ARCH_SET_CPUID, on CPUs with "cpuid_fault"); this
   library's constructor turns that on for the process before main, and its SIGSEGV handler
   executes the instruction with faulting off, clears the hidden features' bits from the answer,
   and steps over it. The "flags" line of /proc/cpuinfo, which runtime/cpu.py reads, is filtered
   the same way for whatever opens it through open/openat (Python does; C's fopen does not). So the process takes the code paths of such a CPU, on this one's cores: a
   measurement of those paths, not of that CPU's speed.

   HIDDEN_CPU_FEATURES (environment):
     avx2        hide AVX-512 (every part), AVX-VNNI and AMX: an AVX2-only CPU
     avx512      hide the VNNI parts (AVX512_VNNI, AVX-VNNI, AMX): AVX-512 without VNNI
   Silent when it works; it exits 125 with one line on stderr when it cannot.

   A SIGSEGV handler the process installs later (Paddle's, Python's faulthandler) is kept aside
   and called for every fault that is not CPUID, so this one stays first. Threads inherit the
   setting; execve resets it, and the child's own copy of this library (LD_PRELOAD is inherited)
   sets it again. */
#define _GNU_SOURCE
#include <cpuid.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define ARCH_SET_CPUID 0x1012

/* Bits cleared in leaf 7 subleaf 0 (ebx, ecx, edx) and subleaf 1 (eax). */
struct mask {
    uint32_t l7_ebx, l7_ecx, l7_edx, l7s1_eax;
    const char *flag_prefixes[8];
};

/* AVX512F DQ IFMA PF ER CD BW VL */
#define AVX512_EBX ((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31))
/* VBMI VBMI2 VNNI BITALG VPOPCNTDQ */
#define AVX512_ECX ((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14))
/* 4VNNIW 4FMAPS VP2INTERSECT AMX-BF16 AVX512_FP16 AMX-TILE AMX-INT8 */
#define AVX512_AMX_EDX ((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25))
#define AMX_EDX ((1u << 22) | (1u << 24) | (1u << 25))
/* AVX-VNNI, AVX512_BF16 */
#define AVX_VNNI_EAX (1u << 4)
#define AVX512_BF16_EAX (1u << 5)

static const struct mask AVX2_ONLY = {
    AVX512_EBX, AVX512_ECX, AVX512_AMX_EDX, AVX_VNNI_EAX | AVX512_BF16_EAX,
    {"avx512", "avx_vnni", "amx", NULL},
};
static const struct mask AVX512_NO_VNNI = {
    0, 1u << 11, AMX_EDX, AVX_VNNI_EAX,
    {"avx512_vnni", "avx_vnni", "amx", NULL},
};

static const struct mask *active;
/* The process's own SIGSEGV disposition, called for faults that are not CPUID. */
static struct sigaction chained = {.sa_handler = SIG_DFL};

static int real_sigaction(int sig, const struct sigaction *action, struct sigaction *old) {
    static int (*real)(int, const struct sigaction *, struct sigaction *);
    if (!real)
        real = (int (*)(int, const struct sigaction *, struct sigaction *))dlsym(RTLD_NEXT, "sigaction");
    return real(sig, action, old);
}

int sigaction(int sig, const struct sigaction *action, struct sigaction *old) {
    if (!active || sig != SIGSEGV)
        return real_sigaction(sig, action, old);
    if (old)
        *old = chained;
    if (action)
        chained = *action;
    return 0;
}

sighandler_t signal(int sig, sighandler_t handler) {
    static sighandler_t (*real)(int, sighandler_t);
    if (!real)
        real = (sighandler_t (*)(int, sighandler_t))dlsym(RTLD_NEXT, "signal");
    if (!active || sig != SIGSEGV)
        return real(sig, handler);
    sighandler_t old = (chained.sa_flags & SA_SIGINFO) ? SIG_DFL : chained.sa_handler;
    memset(&chained, 0, sizeof chained);
    chained.sa_handler = handler;
    chained.sa_flags = SA_RESTART;
    return old;
}

static void fail(const char *why) {
    fprintf(stderr, "hidden_cpu_features: %s\n", why);
    _exit(125);
}

static void on_sigsegv(int sig, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    greg_t *regs = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)regs[REG_RIP];
    if (ip[0] != 0x0f || ip[1] != 0xa2) { /* not CPUID: a real fault, for the process's handler */
        if (chained.sa_flags & SA_SIGINFO) {
            chained.sa_sigaction(sig, info, context);
        } else if (chained.sa_handler != SIG_DFL && chained.sa_handler != SIG_IGN) {
            chained.sa_handler(sig);
        } else { /* crash as without this library: the instruction faults again */
            struct sigaction fallback = {.sa_handler = SIG_DFL};
            real_sigaction(sig, &fallback, NULL);
        }
        return;
    }
    uint32_t leaf = (uint32_t)regs[REG_RAX], sub = (uint32_t)regs[REG_RCX];
    unsigned a, b, c, d;
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
    __cpuid_count(leaf, sub, a, b, c, d);
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
    if (leaf == 7 && sub == 0) {
        b &= ~active->l7_ebx;
        c &= ~active->l7_ecx;
        d &= ~active->l7_edx;
    } else if (leaf == 7 && sub == 1) {
        a &= ~active->l7s1_eax;
    }
    regs[REG_RAX] = a;
    regs[REG_RBX] = b;
    regs[REG_RCX] = c;
    regs[REG_RDX] = d;
    regs[REG_RIP] += 2;
}

static int hidden_flag(const char *flag, size_t length) {
    for (const char *const *p = active->flag_prefixes; *p; p++)
        if (length >= strlen(*p) && strncmp(flag, *p, strlen(*p)) == 0)
            return 1;
    return 0;
}

/* /proc/cpuinfo with the hidden flags left out of every "flags" line, as an in-memory file. */
static int filtered_cpuinfo(int (*real_open)(const char *, int, ...)) {
    int in = real_open("/proc/cpuinfo", O_RDONLY);
    if (in < 0)
        return in;
    FILE *source = fdopen(in, "r");
    int out = memfd_create("cpuinfo", 0);
    FILE *sink = out < 0 ? NULL : fdopen(dup(out), "w");
    if (!source || !sink)
        fail("cannot write the filtered /proc/cpuinfo");
    char *line = NULL;
    size_t capacity = 0;
    while (getline(&line, &capacity, source) > 0) {
        if (strncmp(line, "flags", 5) != 0) {
            fputs(line, sink);
            continue;
        }
        char *colon = strchr(line, ':');
        fwrite(line, 1, colon ? (size_t)(colon - line + 1) : strlen(line), sink);
        for (char *token = colon ? colon + 1 : line + strlen(line); *token;) {
            size_t skip = strspn(token, " \t\n"), length;
            token += skip;
            length = strcspn(token, " \t\n");
            if (length && !hidden_flag(token, length))
                fprintf(sink, " %.*s", (int)length, token);
            token += length;
        }
        fputc('\n', sink);
    }
    free(line);
    fclose(source);
    fclose(sink);
    lseek(out, 0, SEEK_SET);
    return out;
}

#define OPEN_WRAPPER(name)                                                              \
    int name(const char *path, int flags, ...) {                                        \
        static int (*real)(const char *, int, ...);                                     \
        if (!real)                                                                      \
            real = (int (*)(const char *, int, ...))dlsym(RTLD_NEXT, #name);            \
        va_list args;                                                                   \
        va_start(args, flags);                                                          \
        mode_t mode = ((flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE) ? va_arg(args, mode_t) : 0;       \
        va_end(args);                                                                   \
        if (active && strcmp(path, "/proc/cpuinfo") == 0)                       \
            return filtered_cpuinfo(real);                                              \
        return real(path, flags, mode);                                                 \
    }
OPEN_WRAPPER(open)
OPEN_WRAPPER(open64)

#define OPENAT_WRAPPER(name)                                                            \
    int name(int dir, const char *path, int flags, ...) {                               \
        static int (*real)(int, const char *, int, ...);                                \
        static int (*real_open)(const char *, int, ...);                                \
        if (!real) {                                                                    \
            real = (int (*)(int, const char *, int, ...))dlsym(RTLD_NEXT, #name);       \
            real_open = (int (*)(const char *, int, ...))dlsym(RTLD_NEXT, "open");      \
        }                                                                               \
        va_list args;                                                                   \
        va_start(args, flags);                                                          \
        mode_t mode = ((flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE) ? va_arg(args, mode_t) : 0;       \
        va_end(args);                                                                   \
        if (active && strcmp(path, "/proc/cpuinfo") == 0)                       \
            return filtered_cpuinfo(real_open);                                         \
        return real(dir, path, flags, mode);                                            \
    }
OPENAT_WRAPPER(openat)
OPENAT_WRAPPER(openat64)

__attribute__((constructor)) static void hide_cpu_features(void) {
    const char *profile = getenv("HIDDEN_CPU_FEATURES");
    if (!profile || !*profile)
        return;
    if (strcmp(profile, "avx2") == 0)
        active = &AVX2_ONLY;
    else if (strcmp(profile, "avx512") == 0)
        active = &AVX512_NO_VNNI;
    else
        fail("HIDDEN_CPU_FEATURES must be avx2 or avx512");
    struct sigaction action = {0};
    action.sa_sigaction = on_sigsegv;
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    if (real_sigaction(SIGSEGV, &action, NULL) != 0)
        fail("cannot install its SIGSEGV handler");
    if (syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0)
        fail("this CPU or kernel cannot make CPUID fault (no cpuid_fault in /proc/cpuinfo)");
}
