/* A stand-in for libnvidia-ml.so.1, for tests on machines without an NVIDIA driver.
 *
 * It exports the NVML entry points gpufleet resolves, with NVML's ABI, and serves a topology read
 * from the environment at each call, so gpufleet's dlopen path, struct layouts, PCI-bus mapping and
 * CUDA_VISIBLE_DEVICES handling run for real. It is not a mock of gpufleet: the real NVML replaces
 * it on a GPU machine (GPUFLEET_NVML_LIBRARY unset).
 *
 * FAKE_NVML_GPUS: GPUs separated by ';', in NVML (PCI bus) order, each
 *   name|uuid|busId|total|free|utilization|major.minor|pid:used,pid:used
 *   (utilization "-" = not supported; used "-" = not available)
 * FAKE_NVML_INIT_ERROR: when set, nvmlInit_v2 returns this code.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int nvmlReturn_t;
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;
typedef struct {
  char busIdLegacy[16];
  unsigned int domain, bus, device, pciDeviceId, pciSubSystemId;
  char busId[32];
} nvmlPciInfo_t;
typedef struct {
  unsigned int pid;
  unsigned long long usedGpuMemory;
  unsigned int gpuInstanceId, computeInstanceId;
} nvmlProcessInfo_t;

#define MAX_GPUS 16
#define MAX_PROCS 8
typedef struct {
  char name[96], uuid[96], bus[32];
  unsigned long long total, free;
  int util;  /* -1: not supported */
  int major, minor;
  int nprocs;
  unsigned int pids[MAX_PROCS];
  unsigned long long used[MAX_PROCS];
} Gpu;

static Gpu gpus[MAX_GPUS];
static int ngpus;

static void load(void) {
  const char* spec = getenv("FAKE_NVML_GPUS");
  ngpus = 0;
  if (!spec || !*spec) return;
  char* copy = strdup(spec);
  char* save_gpu = NULL;
  for (char* g = strtok_r(copy, ";", &save_gpu); g && ngpus < MAX_GPUS; g = strtok_r(NULL, ";", &save_gpu)) {
    Gpu* d = &gpus[ngpus++];
    memset(d, 0, sizeof(*d));
    char* fields[8] = {0};
    int n = 0;
    for (char* p = g; n < 8; ++n) {
      fields[n] = p;
      char* bar = strchr(p, '|');
      if (!bar) { ++n; break; }
      *bar = 0;
      p = bar + 1;
    }
    snprintf(d->name, sizeof d->name, "%s", fields[0] ? fields[0] : "");
    snprintf(d->uuid, sizeof d->uuid, "%s", fields[1] ? fields[1] : "");
    snprintf(d->bus, sizeof d->bus, "%s", fields[2] ? fields[2] : "");
    d->total = fields[3] ? strtoull(fields[3], NULL, 10) : 0;
    d->free = fields[4] ? strtoull(fields[4], NULL, 10) : 0;
    d->util = (fields[5] && strcmp(fields[5], "-") != 0) ? atoi(fields[5]) : -1;
    if (fields[6]) sscanf(fields[6], "%d.%d", &d->major, &d->minor);
    if (fields[7] && *fields[7]) {
      char* save_p = NULL;
      for (char* p = strtok_r(fields[7], ",", &save_p); p && d->nprocs < MAX_PROCS; p = strtok_r(NULL, ",", &save_p)) {
        char* colon = strchr(p, ':');
        d->pids[d->nprocs] = (unsigned)strtoul(p, NULL, 10);
        d->used[d->nprocs] = (colon && strcmp(colon + 1, "-") != 0) ? strtoull(colon + 1, NULL, 10) : ~0ULL;
        d->nprocs++;
      }
    }
  }
  free(copy);
}

typedef struct nvmlDevice_st* nvmlDevice_t;
static Gpu* dev(nvmlDevice_t h) { return (Gpu*)h; }

nvmlReturn_t nvmlInit_v2(void) {
  const char* e = getenv("FAKE_NVML_INIT_ERROR");
  if (e && *e) return atoi(e);
  load();
  return 0;
}
nvmlReturn_t nvmlShutdown(void) { return 0; }
const char* nvmlErrorString(nvmlReturn_t r) { return r == 9 ? "Driver Not Loaded" : "Unknown Error"; }
nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int* n) {
  load(); /* re-read the spec, so tests can change the topology between discoveries */
  *n = (unsigned)ngpus;
  return 0;
}
nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int i, nvmlDevice_t* h) {
  if (i >= (unsigned)ngpus) return 2; /* INVALID_ARGUMENT */
  *h = (nvmlDevice_t)&gpus[i];
  return 0;
}
nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t h, char* buf, unsigned int len) {
  snprintf(buf, len, "%s", dev(h)->name);
  return 0;
}
nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t h, char* buf, unsigned int len) {
  snprintf(buf, len, "%s", dev(h)->uuid);
  return 0;
}
nvmlReturn_t nvmlDeviceGetPciInfo_v3(nvmlDevice_t h, nvmlPciInfo_t* pci) {
  memset(pci, 0, sizeof(*pci));
  snprintf(pci->busId, sizeof pci->busId, "%s", dev(h)->bus);
  return 0;
}
nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t h, nvmlMemory_t* m) {
  m->total = dev(h)->total;
  m->free = dev(h)->free;
  m->used = dev(h)->total - dev(h)->free;
  return 0;
}
nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t h, nvmlUtilization_t* u) {
  if (dev(h)->util < 0) return 3; /* NOT_SUPPORTED */
  u->gpu = (unsigned)dev(h)->util;
  u->memory = 0;
  return 0;
}
nvmlReturn_t nvmlDeviceGetCudaComputeCapability(nvmlDevice_t h, int* major, int* minor) {
  *major = dev(h)->major;
  *minor = dev(h)->minor;
  return 0;
}
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t h, unsigned int* count, nvmlProcessInfo_t* out) {
  Gpu* d = dev(h);
  if (*count < (unsigned)d->nprocs) { *count = (unsigned)d->nprocs; return 7; /* INSUFFICIENT_SIZE */ }
  for (int i = 0; i < d->nprocs; ++i) {
    out[i].pid = d->pids[i];
    out[i].usedGpuMemory = d->used[i];
    out[i].gpuInstanceId = out[i].computeInstanceId = 0xFFFFFFFFu;
  }
  *count = (unsigned)d->nprocs;
  return 0;
}
nvmlReturn_t nvmlSystemGetDriverVersion(char* buf, unsigned int len) {
  snprintf(buf, len, "%s", "999.99.99-fake");
  return 0;
}
nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int* v) {
  *v = 13000;
  return 0;
}
