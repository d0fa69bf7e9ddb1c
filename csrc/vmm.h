// CUDA virtual memory (cuMem*) allocations shared between the processes of one machine as POSIX file
// descriptors: the alternative to cudaIpc* handles that IpcRuntime offers (MixedCommHandler maps its workspace
// this way, as the reference does). The driver's entry points are looked up at run time, so the extension does
// not link libcuda and still loads on a machine without a driver.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>
#include <unistd.h>

#include <cstdint>
#include <type_traits>

#include "kernels/utils.cuh"

namespace moe_a2a::vmm {

struct Api {
    PFN_cuMemCreate_v10020 create;
    PFN_cuMemRelease_v10020 release;
    PFN_cuMemAddressReserve_v10020 reserve;
    PFN_cuMemAddressFree_v10020 address_free;
    PFN_cuMemMap_v10020 map;
    PFN_cuMemUnmap_v10020 unmap;
    PFN_cuMemSetAccess_v10020 set_access;
    PFN_cuMemGetAllocationGranularity_v10020 granularity;
    PFN_cuMemExportToShareableHandle_v10020 export_handle;
    PFN_cuMemImportFromShareableHandle_v10020 import_handle;
};

inline const Api& api() {
    static const Api table = [] {
        Api a{};
        auto get = [](const char* name, auto* fn) {
            cudaDriverEntryPointQueryResult found{};
            void* p = nullptr;
            const cudaError_t err = cudaGetDriverEntryPointByVersion(name, &p, 12000, cudaEnableDefault, &found);
            MOE_A2A_CHECK(err == cudaSuccess && found == cudaDriverEntryPointSuccess && p != nullptr,
                          "the CUDA driver has no ", name, " (virtual memory needs CUDA 12 or newer)");
            *fn = reinterpret_cast<std::remove_pointer_t<decltype(fn)>>(p);
        };
        get("cuMemCreate", &a.create);
        get("cuMemRelease", &a.release);
        get("cuMemAddressReserve", &a.reserve);
        get("cuMemAddressFree", &a.address_free);
        get("cuMemMap", &a.map);
        get("cuMemUnmap", &a.unmap);
        get("cuMemSetAccess", &a.set_access);
        get("cuMemGetAllocationGranularity", &a.granularity);
        get("cuMemExportToShareableHandle", &a.export_handle);
        get("cuMemImportFromShareableHandle", &a.import_handle);
        return a;
    }();
    return table;
}

#define MOE_A2A_CU_CHECK(expr)                                                                          \
    do {                                                                                                \
        const CUresult r_ = (expr);                                                                     \
        MOE_A2A_CHECK(r_ == CUDA_SUCCESS, #expr " failed with CUresult ", static_cast<int>(r_));       \
    } while (0)

// Device memory of `device`, exportable as a POSIX file descriptor.
inline CUmemAllocationProp properties(int device) {
    CUmemAllocationProp p{};
    p.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    p.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    p.location.id = device;
    p.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    return p;
}

// One physical allocation (created here or imported) mapped read-write for `device` at `ptr`.
struct Mapping {
    CUmemGenericAllocationHandle handle = 0;
    CUdeviceptr ptr = 0;
    size_t size = 0;
};

inline void map_for(Mapping& m, int device) {
    MOE_A2A_CU_CHECK(api().reserve(&m.ptr, m.size, 0, 0, 0));
    MOE_A2A_CU_CHECK(api().map(m.ptr, m.size, 0, m.handle, 0));
    CUmemAccessDesc access{};
    access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    access.location.id = device;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    MOE_A2A_CU_CHECK(api().set_access(m.ptr, m.size, &access, 1));
}

// `bytes` (rounded up to the allocation granularity, the same on every rank of a machine) of new memory.
inline Mapping create(size_t bytes, int device) {
    const CUmemAllocationProp p = properties(device);
    size_t granularity = 0;
    MOE_A2A_CU_CHECK(api().granularity(&granularity, &p, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED));
    Mapping m;
    m.size = (bytes + granularity - 1) / granularity * granularity;
    MOE_A2A_CU_CHECK(api().create(&m.handle, m.size, &p, 0));
    map_for(m, device);
    return m;
}

// A new file descriptor for `m`'s memory (the caller closes it once it has been passed on).
inline int export_fd(const Mapping& m) {
    int fd = -1;
    MOE_A2A_CU_CHECK(api().export_handle(&fd, m.handle, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0));
    return fd;
}

// Map another process's allocation of `size` bytes from a descriptor received from it (closed here).
inline Mapping import_fd(int fd, size_t size, int device) {
    Mapping m;
    m.size = size;
    const CUresult r = api().import_handle(&m.handle, reinterpret_cast<void*>(static_cast<uintptr_t>(fd)),
                                           CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR);
    close(fd);
    MOE_A2A_CHECK(r == CUDA_SUCCESS, "cuMemImportFromShareableHandle failed with CUresult ", static_cast<int>(r));
    map_for(m, device);
    return m;
}

// Unmap and release; errors are ignored (teardown).
inline void release(Mapping& m) {
    if (m.ptr) {
        api().unmap(m.ptr, m.size);
        api().address_free(m.ptr, m.size);
    }
    if (m.handle) api().release(m.handle);
    m = Mapping{};
}

}  // namespace moe_a2a::vmm
