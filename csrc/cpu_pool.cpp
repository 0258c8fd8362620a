// A caching allocator for torch's large CPU buffers: what a plan's activations come from.
//
// Every step of a plan allocates its output afresh (through torch, oneDNN or Kiln's own
// kernels) and frees it after its last use. Through glibc, buffers under its mmap threshold
// come from the heap, where long-lived small objects sit between them: when the sizes vary
// from call to call (a dynamic plan serving batches of 1-32) the freed space does not fit
// the next sizes, the heap grows, and the process keeps far more than a call needs. Buffers
// above the threshold are mapped per call and fault every page in again.
//
// This pool serves requests of at least `threshold` bytes (smaller ones go to the allocator
// it replaces) from mappings of its own, as PyTorch's CUDA caching allocator does on the
// GPU:
// * a freed block is kept (cached) and handed out again: the smallest cached block that
//   fits, split when what is left is itself a block worth keeping (>= threshold), so a
//   small tensor never pins a large block;
// * a freed block merges with the free neighbours it was split from, so the blocks of the
//   largest call seen come back whole for the next large call (a plan's sizes grow
//   together with the batch, so its largest call's blocks serve every smaller one);
// * the pool is bounded: what it has mapped (live and cached) never exceeds 1.25x the most
//   bytes that were ever live at once (the high-water mark); past that the least recently
//   freed blocks are unmapped. A block left cached for longer than `idle_seconds` is
//   unmapped at the pool's next use (so a burst of large tensors the process freed, its
//   own or a plan's, is given back once the work moves on), and `empty_cache` unmaps every
//   cached block and restarts the high-water mark from what is live.
//
// torch's raw allocations (oneDNN's buffers through ideep) need the data pointer to be the
// context and a deleter that takes it: the deleter looks the pointer up, and hands pointers
// it does not own (allocated below the threshold, or before the pool was installed) to the
// deleter of the allocator it replaced. Once installed the pool stays for the process: a
// block it handed out may be freed through whichever allocator torch holds at that time.
#include <c10/core/CPUAllocator.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <pthread.h>
#include <sys/mman.h>
#include <time.h>

#include <algorithm>
#include <cstdint>
#include <climits>
#include <cstring>
#include <list>
#include <map>
#include <mutex>
#include <new>
#include <unordered_map>

namespace {

constexpr size_t kPage = 4096;

struct Block {
  char* ptr = nullptr;
  size_t size = 0;
  bool free = false;
  Block* prev = nullptr;  // the neighbours this block was split from (same mapping), or null
  Block* next = nullptr;
  std::multimap<size_t, Block*>::iterator by_size;  // valid while free (cached)
  std::list<Block*>::iterator lru;                  // valid while free (cached)
  uint64_t freed_ns = 0;                            // when it was cached
};

uint64_t now_ns() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC_COARSE, &t);
  return uint64_t(t.tv_sec) * 1000000000u + uint64_t(t.tv_nsec);
}

struct Stats {
  size_t live = 0, cached = 0, high_water = 0, mapped = 0;
  size_t hits = 0, misses = 0, splits = 0, merges = 0, unmapped = 0;
};

class Pool final : public c10::Allocator {
 public:
  static Pool& instance() {
    static Pool* pool = new Pool();  // never destroyed: blocks may be freed at exit
    return *pool;
  }

  void install(size_t threshold, double idle_seconds) {
    std::lock_guard<std::mutex> g(mu_);
    if (fallback_ != nullptr) return;
    threshold_ = std::max(threshold, kPage);
    idle_ns_ = uint64_t(std::max(idle_seconds, 0.0) * 1e9);
    fallback_ = c10::GetCPUAllocator();
    fallback_raw_ = fallback_->raw_deleter();
    c10::SetCPUAllocator(this, 0);
  }
  bool installed() const { return fallback_ != nullptr; }

  c10::DataPtr allocate(size_t n) override {
    if (n < threshold_) return fallback_->allocate(n);
    if (n > SIZE_MAX - kPage) throw std::bad_alloc();
    const size_t size = (n + kPage - 1) & ~(kPage - 1);
    Block* b = take(size);
    if (b == nullptr) b = map(size);
    report(b->ptr, int64_t(b->size));
    return c10::DataPtr(b->ptr, b->ptr, &Pool::release, c10::Device(c10::DeviceType::CPU));
  }
  c10::DeleterFnPtr raw_deleter() const override { return &Pool::release; }
  void copy_data(void* dest, const void* src, size_t count) const override { std::memcpy(dest, src, count); }

  size_t empty_cache() {
    std::lock_guard<std::mutex> g(mu_);
    size_t freed = 0;
    while (!lru_.empty()) freed += unmap_lru();
    stats_.high_water = stats_.live;  // the bound starts again from what is in use
    return freed;
  }
  Stats stats() {
    std::lock_guard<std::mutex> g(mu_);
    return stats_;
  }
  // fork() while another thread holds the lock would leave the child's copy locked forever
  void before_fork() { mu_.lock(); }
  void after_fork() { mu_.unlock(); }

 private:
  // The smallest cached block of at least `size` bytes, split when the rest is worth keeping.
  Block* take(size_t size) {
    std::lock_guard<std::mutex> g(mu_);
    auto it = free_.lower_bound(size);
    if (it == free_.end()) return nullptr;
    Block* b = it->second;
    unlist(b);
    if (b->size - size >= threshold_) {
      Block* rest = new_block(b->ptr + size, b->size - size);
      rest->free = true;
      rest->prev = b;
      rest->next = b->next;
      if (b->next != nullptr) b->next->prev = rest;
      b->next = rest;
      b->size = size;
      owned_.emplace(rest->ptr, rest);
      list(rest);
      stats_.splits++;
    }
    stats_.hits++;
    mark_live(b);
    trim();
    return b;
  }

  Block* map(size_t size) {
    void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      empty_cache();  // what is cached may be what stands in the way
      p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) throw std::bad_alloc();
    }
    Block* b = new_block(static_cast<char*>(p), size);
    std::lock_guard<std::mutex> g(mu_);
    owned_.emplace(b->ptr, b);
    stats_.mapped += size;
    stats_.misses++;
    mark_live(b);
    trim();
    return b;
  }

  static Block* new_block(char* ptr, size_t size) {
    Block* b = new Block();
    b->ptr = ptr;
    b->size = size;
    return b;
  }

  void mark_live(Block* b) {
    b->free = false;
    stats_.live += b->size;
    stats_.high_water = std::max(stats_.high_water, stats_.live);
  }

  static void release(void* ptr) {
    Pool& pool = instance();
    size_t size = 0;
    {
      std::lock_guard<std::mutex> g(pool.mu_);
      auto it = pool.owned_.find(ptr);
      if (it != pool.owned_.end()) {
        size = it->second->size;
        pool.give_back(it->second);
      }
    }
    if (size != 0) {
      pool.report(ptr, -int64_t(size));
    } else if (pool.fallback_raw_ != nullptr) {
      pool.fallback_raw_(ptr);  // not ours: a small or an older buffer
    }
  }

  // What torch's own CPU allocator tells the profiler (torch.profiler's profile_memory).
  void report(void* ptr, int64_t bytes) {
    if (!c10::memoryProfilingEnabled()) return;
    Stats s = stats();
    c10::reportMemoryUsageToProfiler(ptr, bytes, s.live, s.mapped, c10::Device(c10::DeviceType::CPU));
  }

  // A live block comes back: merged with its free neighbours, cached, the cache trimmed.
  void give_back(Block* b) {
    stats_.live -= b->size;
    b->free = true;
    if (b->next != nullptr && b->next->free) {
      unlist(b->next);
      absorb(b, b->next);
    }
    if (b->prev != nullptr && b->prev->free) {
      Block* a = b->prev;
      unlist(a);
      absorb(a, b);
      b = a;
    }
    list(b);
    trim();
  }

  // Keep live + cached within 1.25x the high-water mark, and nothing cached that has not
  // been used for idle_ns_: unmap the least recently freed.
  void trim() {
    const size_t cap = stats_.high_water + stats_.high_water / 4;
    while (stats_.live + stats_.cached > cap && !lru_.empty()) unmap_lru();
    const uint64_t now = now_ns();
    while (!lru_.empty() && now - lru_.back()->freed_ns > idle_ns_) unmap_lru();
  }

  // `b`, the next neighbour of `a` (both free and unlisted), becomes part of `a`.
  void absorb(Block* a, Block* b) {
    a->size += b->size;
    a->next = b->next;
    if (b->next != nullptr) b->next->prev = a;
    owned_.erase(b->ptr);
    delete b;
    stats_.merges++;
  }

  // Cached (free) blocks are listed by size and by recency.
  void list(Block* b) {
    b->freed_ns = now_ns();
    b->by_size = free_.emplace(b->size, b);
    lru_.push_front(b);
    b->lru = lru_.begin();
    stats_.cached += b->size;
  }
  void unlist(Block* b) {
    free_.erase(b->by_size);
    lru_.erase(b->lru);
    stats_.cached -= b->size;
  }

  // Unmap the least recently freed block; its neighbours stop being neighbours.
  size_t unmap_lru() {
    Block* b = lru_.back();
    const size_t size = b->size;
    unlist(b);
    if (b->prev != nullptr) b->prev->next = nullptr;
    if (b->next != nullptr) b->next->prev = nullptr;
    owned_.erase(b->ptr);
    munmap(b->ptr, size);
    delete b;
    stats_.mapped -= size;
    stats_.unmapped++;
    return size;
  }

  std::mutex mu_;
  size_t threshold_ = size_t(1) << 20;
  uint64_t idle_ns_ = 10000000000u;
  c10::Allocator* fallback_ = nullptr;
  c10::DeleterFnPtr fallback_raw_ = nullptr;
  std::unordered_map<void*, Block*> owned_;  // every block, live or cached, by its pointer
  std::multimap<size_t, Block*> free_;       // cached blocks by size
  std::list<Block*> lru_;                    // cached blocks, most recently freed first
  Stats stats_;
};

void install(size_t threshold, double idle_seconds) {
  static std::once_flag fork_handlers;
  std::call_once(fork_handlers, [] {
    pthread_atfork([] { Pool::instance().before_fork(); }, [] { Pool::instance().after_fork(); },
                   [] { Pool::instance().after_fork(); });
  });
  Pool::instance().install(threshold, idle_seconds);
}

pybind11::dict stats() {
  Stats s = Pool::instance().stats();
  pybind11::dict d;
  d["live_bytes"] = s.live;
  d["cached_bytes"] = s.cached;
  d["high_water_bytes"] = s.high_water;
  d["mapped_bytes"] = s.mapped;
  d["hits"] = s.hits;
  d["misses"] = s.misses;
  d["splits"] = s.splits;
  d["merges"] = s.merges;
  d["unmapped"] = s.unmapped;
  return d;
}

}  // namespace

PYBIND11_MODULE(_cpu_pool, m) {
  m.doc() = "Kiln's caching allocator for torch's large CPU buffers (see csrc/cpu_pool.cpp).";
  m.def("install", &install, pybind11::arg("threshold"), pybind11::arg("idle_seconds"),
        "Serve torch's CPU allocations of at least `threshold` bytes from the pool (once per process); "
        "a block cached for longer than `idle_seconds` is unmapped at the pool's next use.");
  m.def("installed", [] { return Pool::instance().installed(); });
  m.def("stats", &stats, "live, cached, high-water and mapped bytes; hits, misses, splits, merges, unmapped blocks");
  m.def("empty_cache", [] { return Pool::instance().empty_cache(); },
        "Unmap every cached block and restart the high-water mark from the live bytes; returns the "
        "bytes given back to the OS.");
}
