// runtime.cpp: the emu device's scheduler. One fiber per CUDA thread, blocks run one after another
// on the calling OS thread (one worker is the fastest choice on a 2-core machine), and fibers switch
// only at barriers. See emu.h for the model and its limits.
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cerrno>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <string>
#include <vector>

#include "emu.h"

#if !defined(__x86_64__)
#error "the emu device's context switch is written for x86-64"
#endif

// Saves the callee-saved registers on the current stack, stores the stack pointer in *save and
// resumes the fiber whose stack pointer is `load` (System V x86-64 ABI). `reclmis_emu_restore` is
// its second half: entered with rsp = a stack pointer that reclmis_emu_switch saved, it resumes
// that context (the fault handler uses it to abandon an overflowed fiber).
extern "C" void reclmis_emu_switch(void** save, void* load);
extern "C" void reclmis_emu_restore();
asm(R"(
    .text
    .globl reclmis_emu_switch
    .hidden reclmis_emu_switch
    .type reclmis_emu_switch,@function
    .globl reclmis_emu_restore
    .hidden reclmis_emu_restore
reclmis_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
reclmis_emu_restore:
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size reclmis_emu_switch,.-reclmis_emu_switch
)");

namespace emu {
thread_local uint3 cur_thread_idx;
thread_local uint3 cur_block_idx;
thread_local dim3 cur_block_dim;
thread_local dim3 cur_grid_dim;

namespace {
enum State : uint8_t { RUNNABLE, WAIT_BLOCK, WAIT_WARP, DONE, TRAPPED };

// A cp.async in flight: the bytes were read from global memory at the issue; they land in shared
// memory at the wait that retires their group.
struct Copy {
    unsigned char* dst;
    unsigned char data[16];
    unsigned bytes;
};

struct Fiber {
    void* sp;
    State state;
    int site;
    uint3 tid;
    std::vector<Copy> open;                 // issued, not yet committed
    std::deque<std::vector<Copy>> groups;   // committed, oldest first
};

// What a launch's shared-memory phases cost (see emu::LaunchStats in emu.h).
thread_local uint64_t g_phases = 0, g_extra_wavefronts = 0;

// Per kernel thread stack: kernels keep register tiles and small arrays on it. Each stack has a
// PROT_NONE guard page below it (stacks grow down), so an overflow faults instead of corrupting
// the neighbouring fiber's stack; the fault handler turns it into a launch error.
constexpr size_t kStack = 48 * 1024;
constexpr size_t kSlots = 16;

struct Block {
    const LaunchCfg* cfg = nullptr;
    BodyFn body = nullptr;
    void* ctx = nullptr;
    std::vector<Fiber> fibers;
    unsigned nthreads = 0;
    unsigned cur = 0;
    void* sched_sp = nullptr;
    std::vector<uint64_t> slots;  // [warp][lane][kSlots]
    std::string trap_msg;
    // Set by the fault handler (which must not allocate) when a fiber hit its stack's guard page.
    volatile sig_atomic_t overflowed = 0;
};

// One mapping per OS thread: `count` slots of [guard page | kStack bytes of stack].
struct Stacks {
    char* base = nullptr;
    size_t count = 0;
    size_t slot = 0;
    ~Stacks() {
        if (base) munmap(base, count * slot);
    }
};

// An alternate signal stack for threads that have none (Rust's std gives its own threads one), so
// the fault handler can run although the faulting fiber's stack is exhausted.
struct AltStack {
    void* mem = nullptr;
    size_t bytes = 0;
    ~AltStack() {
        if (!mem) return;
        stack_t off{};
        off.ss_flags = SS_DISABLE;
        sigaltstack(&off, nullptr);
        munmap(mem, bytes);
    }
};

thread_local Block* g_block = nullptr;
thread_local Stacks g_stacks;
thread_local AltStack g_altstack;
thread_local std::vector<unsigned char> g_smem;

struct Rng {
    uint64_t s;
    uint64_t next() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        return s;
    }
};

void fiber_entry() {
    Block* b = g_block;
    Fiber& f = b->fibers[b->cur];
    b->body(b->ctx);
    if (!f.open.empty() || !f.groups.empty()) {
        size_t n = f.open.size();
        for (const auto& g : f.groups) n += g.size();
        char buf[160];
        snprintf(buf, sizeof buf, "thread exits with %zu cp.async copies never retired by a cp.async.wait_group", n);
        b->trap_msg = buf;
        f.state = TRAPPED;
        reclmis_emu_switch(&f.sp, b->sched_sp);
        __builtin_unreachable();
    }
    f.state = DONE;
    reclmis_emu_switch(&f.sp, b->sched_sp);
    __builtin_unreachable();
}

void set_current(Block* b, unsigned i) {
    b->cur = i;
    cur_thread_idx = b->fibers[i].tid;
}

// Switches from the running fiber back to the scheduler after marking why it stopped.
void park(State s, int site) {
    Block* b = g_block;
    Fiber& f = b->fibers[b->cur];
    f.state = s;
    f.site = site;
    reclmis_emu_switch(&f.sp, b->sched_sp);
    // Resumed by the scheduler, which already restored threadIdx.
}

size_t page_size() {
    static const size_t p = (size_t)sysconf(_SC_PAGESIZE);
    return p;
}

bool ensure_stacks(size_t n) {
    if (n <= g_stacks.count) return true;
    const size_t page = page_size();
    const size_t slot = page + (kStack + page - 1) / page * page;
    // Pages are committed only when a fiber touches them, so unused stack costs address space only.
    void* m = mmap(nullptr, n * slot, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return false;
    char* base = static_cast<char*>(m);
    for (size_t i = 0; i < n; ++i) {
        if (mprotect(base + i * slot, page, PROT_NONE) != 0) {
            munmap(m, n * slot);
            return false;
        }
    }
    if (g_stacks.base) munmap(g_stacks.base, g_stacks.count * g_stacks.slot);
    g_stacks.base = base;
    g_stacks.count = n;
    g_stacks.slot = slot;
    return true;
}

// Whether `addr` lies in the guard page of one of this thread's fiber stacks.
bool in_guard_page(const char* addr) {
    const Stacks& s = g_stacks;
    if (!s.base || addr < s.base || addr >= s.base + s.count * s.slot) return false;
    return (size_t)(addr - s.base) % s.slot < page_size();
}

struct sigaction g_prev_segv, g_prev_bus;

// SIGSEGV/SIGBUS: a fiber that ran into its guard page is abandoned (its block's scheduler resumes
// and reports the overflow); any other fault goes to the handler that was installed before ours
// (Rust's own stack-overflow check, or the default action).
void on_fault(int sig, siginfo_t* info, void* uctx) {
    Block* b = g_block;
    if (b != nullptr && in_guard_page(static_cast<const char*>(info->si_addr))) {
        b->overflowed = 1;
        b->fibers[b->cur].state = TRAPPED;
        auto* uc = static_cast<ucontext_t*>(uctx);
        uc->uc_mcontext.gregs[REG_RSP] = reinterpret_cast<greg_t>(b->sched_sp);
        uc->uc_mcontext.gregs[REG_RIP] = reinterpret_cast<greg_t>(&reclmis_emu_restore);
        return;  // sigreturn resumes the scheduler as if the fiber had parked
    }
    const struct sigaction& prev = sig == SIGBUS ? g_prev_bus : g_prev_segv;
    if (prev.sa_flags & SA_SIGINFO) {
        prev.sa_sigaction(sig, info, uctx);
    } else if (prev.sa_handler == SIG_DFL || prev.sa_handler == SIG_IGN) {
        // Returning re-executes the faulting instruction, which then gets the default action.
        signal(sig, SIG_DFL);
    } else {
        prev.sa_handler(sig);
    }
}

void init_fiber(Fiber& f, unsigned i) {
    char* top = g_stacks.base + (size_t)(i + 1) * g_stacks.slot;
    uint64_t* sp = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(top) & ~uintptr_t(15));
    *--sp = 0;  // fake return address: fiber_entry starts with rsp = 8 (mod 16) as after a call
    *--sp = reinterpret_cast<uint64_t>(&fiber_entry);
    for (int r = 0; r < 6; ++r) *--sp = 0;  // rbp rbx r12 r13 r14 r15
    f.sp = sp;
    f.state = RUNNABLE;
    f.site = 0;
    f.open.clear();
    f.groups.clear();
}

void fmt(char* err, size_t errlen, const char* f, ...) {
    va_list ap;
    va_start(ap, f);
    vsnprintf(err, errlen, f, ap);
    va_end(ap);
}

const char* state_name(State s) {
    switch (s) {
        case RUNNABLE: return "runnable";
        case WAIT_BLOCK: return "__syncthreads";
        case WAIT_WARP: return "a warp collective";
        case DONE: return "exit";
        case TRAPPED: return "trap";
    }
    return "?";
}

// Runs one block to completion. Returns 0, or 1 with a message in err.
int run_block(Block& b, Rng& rng, int mode, char* err, size_t errlen) {
    const unsigned n = b.nthreads;
    const unsigned nwarps = (n + 31) / 32;
    std::vector<unsigned> order(n);
    for (unsigned i = 0; i < n; ++i) {
        init_fiber(b.fibers[i], i);
    }
    for (;;) {
        // One phase: run every runnable fiber until it parks. The order is what exposes races.
        for (unsigned i = 0; i < n; ++i) order[i] = mode == 1 ? n - 1 - i : i;
        if (mode == 2)
            for (unsigned i = n; i > 1; --i) std::swap(order[i - 1], order[rng.next() % i]);
        for (unsigned k = 0; k < n; ++k) {
            unsigned i = order[k];
            if (b.fibers[i].state != RUNNABLE) continue;
            set_current(&b, i);
            reclmis_emu_switch(&b.sched_sp, b.fibers[i].sp);
            if (b.fibers[i].state == TRAPPED) {
                const uint3 t = b.fibers[i].tid;
                if (b.overflowed) {
                    fmt(err, errlen,
                        "thread (%u,%u,%u): stack overflow (the kernel's locals need more than the emu's %zu KiB "
                        "per-thread stack)",
                        t.x, t.y, t.z, kStack / 1024);
                } else {
                    fmt(err, errlen, "thread (%u,%u,%u): %s", t.x, t.y, t.z, b.trap_msg.c_str());
                }
                return 1;
            }
        }
        bool all_done = true, released = false;
        for (unsigned i = 0; i < n; ++i) all_done &= b.fibers[i].state == DONE;
        if (all_done) return 0;
        // Warp collectives: release a warp once every live lane waits at the same one.
        for (unsigned w = 0; w < nwarps; ++w) {
            unsigned lo = w * 32, hi = std::min(n, lo + 32);
            unsigned waiting = 0, done = 0, other = 0;
            int site = -1;
            bool same = true;
            for (unsigned i = lo; i < hi; ++i) {
                const Fiber& f = b.fibers[i];
                if (f.state == WAIT_WARP) {
                    if (site >= 0 && f.site != site) same = false;
                    site = f.site;
                    ++waiting;
                } else if (f.state == DONE) {
                    ++done;
                } else {
                    ++other;
                }
            }
            if (waiting == 0 || other != 0) continue;
            if (done != 0) {
                fmt(err, errlen,
                    "warp %u: a warp collective (line %d) was reached by %u lanes while %u lanes had already "
                    "exited (full-warp convergence is required)",
                    w, site, waiting, done);
                return 1;
            }
            if (!same) {
                fmt(err, errlen, "warp %u: lanes wait at warp collectives on different lines (divergence)", w);
                return 1;
            }
            for (unsigned i = lo; i < hi; ++i) b.fibers[i].state = RUNNABLE;
            released = true;
        }
        if (released) continue;
        // Block barrier: every thread must wait at the same __syncthreads.
        unsigned waiting = 0, done = 0;
        int site = -1, other_site = -1;
        for (unsigned i = 0; i < n; ++i) {
            const Fiber& f = b.fibers[i];
            if (f.state == WAIT_BLOCK) {
                if (site < 0) site = f.site;
                else if (f.site != site) other_site = f.site;
                ++waiting;
            } else if (f.state == DONE) {
                ++done;
            }
        }
        if (waiting + done == n && waiting > 0) {
            if (done != 0) {
                fmt(err, errlen,
                    "barrier divergence: __syncthreads (line %d) reached by %u of %u threads; the other %u had "
                    "exited",
                    site, waiting, n, done);
                return 1;
            }
            if (other_site >= 0) {
                fmt(err, errlen, "barrier divergence: threads wait at __syncthreads on lines %d and %d", site,
                    other_site);
                return 1;
            }
            for (unsigned i = 0; i < n; ++i) b.fibers[i].state = RUNNABLE;
            continue;
        }
        // Nothing can move: describe the first two threads that disagree.
        unsigned a = 0;
        while (a < n && b.fibers[a].state == DONE) ++a;
        unsigned c = a + 1;
        while (c < n && (b.fibers[c].state == DONE || b.fibers[c].state == b.fibers[a].state)) ++c;
        if (c >= n) c = a;
        const Fiber &fa = b.fibers[a], &fc = b.fibers[c];
        fmt(err, errlen,
            "deadlock: thread (%u,%u,%u) waits at %s (line %d) while thread (%u,%u,%u) waits at %s (line %d)",
            fa.tid.x, fa.tid.y, fa.tid.z, state_name(fa.state), fa.site, fc.tid.x, fc.tid.y, fc.tid.z,
            state_name(fc.state), fc.site);
        return 1;
    }
}
}  // namespace

// Installs the fault handler once per process and an alternate signal stack once per thread.
bool install_fault_handler(char* err, size_t errlen) {
    static std::once_flag once;
    static int failed = 0;
    std::call_once(once, [] {
        struct sigaction sa {};
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGSEGV, &sa, &g_prev_segv) != 0 || sigaction(SIGBUS, &sa, &g_prev_bus) != 0) failed = errno;
    });
    if (failed) {
        fmt(err, errlen, "cannot install the fault handler that catches fiber stack overflows (errno %d)", failed);
        return false;
    }
    stack_t cur{};
    if (sigaltstack(nullptr, &cur) == 0 && !(cur.ss_flags & SS_DISABLE)) return true;
    if (g_altstack.mem) return true;
    const size_t bytes = 64 * 1024;
    void* m = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
        fmt(err, errlen, "cannot allocate an alternate signal stack");
        return false;
    }
    stack_t ss{};
    ss.ss_sp = m;
    ss.ss_size = bytes;
    if (sigaltstack(&ss, nullptr) != 0) {
        munmap(m, bytes);
        fmt(err, errlen, "cannot install an alternate signal stack (errno %d)", errno);
        return false;
    }
    g_altstack.mem = m;
    g_altstack.bytes = bytes;
    return true;
}

void sync_block(int site) { park(WAIT_BLOCK, site); }
void sync_warp(int site) { park(WAIT_WARP, site); }

uint64_t* warp_slots() {
    Block* b = g_block;
    unsigned w = b->cur / 32;
    return &b->slots[(size_t)w * 32 * kSlots];
}
unsigned lane() { return g_block->cur % 32; }
unsigned warp_live_mask() {
    Block* b = g_block;
    unsigned lo = b->cur / 32 * 32, hi = std::min(b->nthreads, lo + 32), m = 0;
    for (unsigned i = lo; i < hi; ++i)
        if (b->fibers[i].state != DONE) m |= 1u << (i - lo);
    return m;
}
// 128-byte aligned like the GPU's shared memory window, so that bank arithmetic on addresses holds.
void* dynamic_smem() {
    const uintptr_t p = reinterpret_cast<uintptr_t>(g_smem.data());
    return reinterpret_cast<void*>((p + 127) & ~uintptr_t(127));
}

void cp_async(void* dst, const void* src, unsigned cp_size, unsigned src_size, int site) {
    if (cp_size != 4 && cp_size != 8 && cp_size != 16) trap("cp.async of other than 4, 8 or 16 bytes", site);
    if (src_size > cp_size) trap("cp.async src-size larger than its cp-size", site);
    const uintptr_t d = reinterpret_cast<uintptr_t>(dst), s = reinterpret_cast<uintptr_t>(src);
    if (d % cp_size != 0 || (src_size != 0 && s % cp_size != 0)) trap("cp.async address not aligned to its size", site);
    const uintptr_t lo = reinterpret_cast<uintptr_t>(dynamic_smem());
    const uintptr_t hi = lo + g_block->cfg->smem_bytes;
    if (d < lo || d + cp_size > hi) trap("cp.async destination outside the dynamic shared memory", site);
    Copy c;
    c.dst = static_cast<unsigned char*>(dst);
    c.bytes = cp_size;
    std::memset(c.data, 0, sizeof c.data);
    if (src_size) std::memcpy(c.data, src, src_size);
    g_block->fibers[g_block->cur].open.push_back(c);
}

void cp_async_commit() {
    Fiber& f = g_block->fibers[g_block->cur];
    f.groups.push_back(std::move(f.open));
    f.open.clear();
}

void cp_async_wait(unsigned n) {
    Fiber& f = g_block->fibers[g_block->cur];
    while (f.groups.size() > n) {
        for (const Copy& c : f.groups.front()) std::memcpy(c.dst, c.data, c.bytes);
        f.groups.pop_front();
    }
}

// Shared memory serves a warp's phase in wavefronts of 32 banks x 4 bytes: a bank asked for k
// distinct words costs k wavefronts (the same word is broadcast).
void note_smem_phase(const uintptr_t* addrs, unsigned count, unsigned bytes) {
    uintptr_t words[32][32];
    unsigned used[32] = {};
    unsigned worst = 1;
    for (unsigned i = 0; i < count; ++i)
        for (unsigned w = 0; w < bytes / 4; ++w) {
            const uintptr_t word = addrs[i] / 4 + w;
            const unsigned bank = (unsigned)(word % 32);
            bool seen = false;
            for (unsigned j = 0; j < used[bank]; ++j) seen |= words[bank][j] == word;
            if (!seen && used[bank] < 32) words[bank][used[bank]++] = word;
            worst = std::max(worst, used[bank]);
        }
    g_phases += 1;
    g_extra_wavefronts += worst - 1;
}

void trap(const char* what, int site) {
    Block* b = g_block;
    char buf[160];
    snprintf(buf, sizeof buf, "%s at line %d", what, site);
    b->trap_msg = buf;
    park(TRAPPED, site);
    __builtin_unreachable();
}

int run_grid(const LaunchCfg* cfg, BodyFn body, void* ctx, char* err, size_t errlen) {
    const unsigned n = cfg->block[0] * cfg->block[1] * cfg->block[2];
    if (n == 0 || n > 1024) {
        fmt(err, errlen, "block of %u threads (CUDA allows 1..1024)", n);
        return 1;
    }
    if (cfg->smem_bytes > 227 * 1024) {
        fmt(err, errlen, "%u bytes of dynamic shared memory (an H100 block has at most 227 KiB)", cfg->smem_bytes);
        return 1;
    }
    if (g_block != nullptr) {
        fmt(err, errlen, "nested launch from inside a kernel");
        return 1;
    }
    if (!ensure_stacks(n)) {
        fmt(err, errlen, "cannot allocate %u fiber stacks", n);
        return 1;
    }
    if (!install_fault_handler(err, errlen)) return 1;
    Block b;
    b.cfg = cfg;
    b.body = body;
    b.ctx = ctx;
    b.nthreads = n;
    b.fibers.resize(n);
    b.slots.assign((size_t)((n + 31) / 32) * 32 * kSlots, 0);
    for (unsigned i = 0; i < n; ++i)
        b.fibers[i].tid = uint3{i % cfg->block[0], (i / cfg->block[0]) % cfg->block[1], i / (cfg->block[0] * cfg->block[1])};
    g_smem.resize(cfg->smem_bytes + 128);  // room to align dynamic_smem() to 128 bytes
    g_phases = 0;
    g_extra_wavefronts = 0;
    cur_block_dim = dim3(cfg->block[0], cfg->block[1], cfg->block[2]);
    cur_grid_dim = dim3(cfg->grid[0], cfg->grid[1], cfg->grid[2]);

    Rng rng{cfg->seed * 0x9E3779B97F4A7C15ull + 0x1234567ull};
    if (rng.s == 0) rng.s = 1;
    const int mode = (int)(cfg->seed % 3);  // 0 forward, 1 reversed, 2 random: varied per launch
    const uint64_t nblocks = (uint64_t)cfg->grid[0] * cfg->grid[1] * cfg->grid[2];
    // Blocks run in a shuffled order too when random, so cross-block order assumptions fail.
    const uint64_t stride = (mode == 2 && nblocks > 1) ? [&] {
        uint64_t s = rng.next() % nblocks;
        auto gcd = [](uint64_t x, uint64_t y) { while (y) { uint64_t t = x % y; x = y; y = t; } return x; };
        while (gcd(s, nblocks) != 1) s = (s + 1) % nblocks;
        return s;
    }() : 1;
    g_block = &b;
    int rc = 0;
    for (uint64_t k = 0; k < nblocks && rc == 0; ++k) {
        uint64_t id = (k * stride) % nblocks;
        if (mode == 1) id = nblocks - 1 - k;
        cur_block_idx = uint3{(unsigned)(id % cfg->grid[0]), (unsigned)((id / cfg->grid[0]) % cfg->grid[1]),
                              (unsigned)(id / ((uint64_t)cfg->grid[0] * cfg->grid[1]))};
        // NaN bytes, so that reading shared memory nobody wrote shows up in the results.
        std::memset(g_smem.data(), 0xff, g_smem.size());
        rc = run_block(b, rng, mode, err, errlen);
        if (rc != 0) {
            char tail[256];
            snprintf(tail, sizeof tail, " [block (%u,%u,%u)]", cur_block_idx.x, cur_block_idx.y, cur_block_idx.z);
            size_t used = strnlen(err, errlen);
            if (used + 1 < errlen) snprintf(err + used, errlen - used, "%s", tail);
        }
    }
    g_block = nullptr;
    return rc;
}
}  // namespace emu

// The last launch's shared-memory phase counts on this thread: [phases, extra wavefronts].
extern "C" void reclmis_emu_last_stats(uint64_t out[2]) {
    out[0] = emu::g_phases;
    out[1] = emu::g_extra_wavefronts;
}
