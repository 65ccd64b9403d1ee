// The one binding between Python and the C kernels. It converts and
// validates, nothing else: every buffer arrives through DLPack (no torch
// headers, no libtorch link), and its device, dtype, contiguity, size and
// overlap are checked here before any pointer reaches a kernel.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "diffq_c.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace py = pybind11;

namespace {

// The DLPack ABI (dlpack.h, v0.x "dltensor" capsules), declared here to keep
// the build free of extra headers.
struct DLDevice {
    int32_t device_type;
    int32_t device_id;
};
struct DLDataType {
    uint8_t code;
    uint8_t bits;
    uint16_t lanes;
};
struct DLTensor {
    void *data;
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t *shape;
    int64_t *strides;
    uint64_t byte_offset;
};
struct DLManagedTensor {
    DLTensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(DLManagedTensor *self);
};
constexpr int32_t kDLCPU = 1;
constexpr uint8_t kDLInt = 0, kDLUInt = 1, kDLFloat = 2;

// DLPack 1.3's exchange table, which a tensor type publishes as the capsule
// `__dlpack_c_exchange_api__` ("dlpack_exchange_api"; torch releases since
// late 2025 do). Its dltensor_from_py_object_no_sync fills a DLTensor
// describing a tensor, without a capsule or an allocation; only the layout
// up to that entry is read, after the header says 1.3 or later of major
// version 1.
struct DLPackVersion {
    uint32_t major;
    uint32_t minor;
};
struct DLPackExchangeAPIHeader {
    DLPackVersion version;
    DLPackExchangeAPIHeader *prev_api;
};
struct DLPackExchangeAPI {
    DLPackExchangeAPIHeader header;
    void *managed_tensor_allocator;
    void *managed_tensor_from_py_object_no_sync;
    void *managed_tensor_to_py_object_no_sync;
    int (*dltensor_from_py_object_no_sync)(void *py_object, DLTensor *out);
    void *current_work_stream;
};

enum class DType { f32, u8, i16, i64, u8_or_i16, f64 };

const char *dtype_name(DType d) {
    switch (d) {
    case DType::f32: return "float32";
    case DType::u8: return "uint8";
    case DType::i16: return "int16";
    case DType::i64: return "int64";
    case DType::u8_or_i16: return "uint8 or int16";
    case DType::f64: return "float64";
    }
    return "?";
}

std::string describe(const DLDataType &t) {
    const char *kind = t.code == kDLFloat ? "float" : t.code == kDLUInt ? "uint" : t.code == kDLInt ? "int" : "other";
    return std::string(kind) + std::to_string(t.bits);
}

// A buffer's dimensions: up to kInline of them held in place, more on the
// heap. A step reads thousands of buffers, and a vector's allocation a
// buffer (two for a matrix, as it grew) was a tenth of the binding's time.
class Shape {
  public:
    static constexpr int kInline = 6;
    size_t size() const { return n_; }
    int64_t operator[](size_t d) const { return n_ <= kInline ? small_[d] : big_[d]; }
    void clear() {
        n_ = 0;
        big_.clear();
    }
    void push_back(int64_t v) {
        if (n_ < kInline) {
            small_[n_++] = v;
            return;
        }
        if (n_ == kInline)
            big_.assign(small_, small_ + kInline);
        big_.push_back(v);
        ++n_;
    }
    bool operator==(const Shape &o) const {
        if (n_ != o.n_)
            return false;
        for (size_t d = 0; d < n_; ++d)
            if ((*this)[d] != o[d])
                return false;
        return true;
    }
    bool operator!=(const Shape &o) const { return !(*this == o); }

  private:
    size_t n_ = 0;
    int64_t small_[kInline];
    std::vector<int64_t> big_;
};

// A validated view of one buffer. The capsule keeps the producer's memory
// alive while a kernel runs.
struct Buffer {
    py::object capsule;
    char *data = nullptr;
    int64_t numel = 0;
    int elem_size = 0;
    Shape shape;
};

[[noreturn]] void type_error(const std::string &msg) { throw py::type_error(msg); }
[[noreturn]] void value_error(const std::string &msg) { throw py::value_error(msg); }

// "Type: message" of a Python exception, without the traceback what() adds.
std::string exception_text(py::error_already_set &e) {
    return std::string(py::str(e.type().attr("__name__"))) + ": " + std::string(py::str(e.value()));
}

// A buffer's name in error messages: "p", "p[3]" or "outs[0][2]", put
// together only when an error needs it (a model's step checks thousands
// of buffers, and building their names cost as much as checking them).
struct Name {
    const char *base;
    int64_t i = -1, j = -1;
    Name(const char *b) : base(b) {}
    Name(const char *b, int64_t i_, int64_t j_ = -1) : base(b), i(i_), j(j_) {}
    std::string str() const {
        std::string s(base);
        if (i >= 0)
            s += "[" + std::to_string(i) + "]";
        if (j >= 0)
            s += "[" + std::to_string(j) + "]";
        return s;
    }
};

// torch's own objects, looked up once: torch tensors are read through
// their public attributes (data_ptr, dtype, shape, ...), which costs about
// a tenth of a DLPack export (0.4 against 5.6 us a tensor measured here).
// A model has hundreds of parameters and a step reads several buffers of
// each, so this is most of the fixed cost per parameter. Anything else
// (numpy arrays, tensor subclasses such as FakeTensor) goes through DLPack.
struct TorchObjects {
    PyObject *tensor_type = nullptr, *parameter_type = nullptr, *strided = nullptr;
    PyObject *dtypes[6] = {nullptr};  // indexed by DType, u8_or_i16 unused
    PyObject *s_is_cpu, *s_layout, *s_dtype, *s_shape, *s_is_contiguous, *s_data_ptr;
    // torch.Tensor's DLPack exchange entry, or null where torch has none
    int (*fill_dltensor)(void *py_object, DLTensor *out) = nullptr;
    bool use_fill = true;  // dlpack_exchange() switches it, for tests
    bool ready = false;
};

// The exchange table's DLTensor filler of `type`, or null (no table, an
// older or unknown version, no such entry).
decltype(DLPackExchangeAPI::dltensor_from_py_object_no_sync) exchange_filler(PyObject *type) {
    PyObject *cap = PyObject_GetAttrString(type, "__dlpack_c_exchange_api__");
    if (!cap) {
        PyErr_Clear();
        return nullptr;
    }
    auto *api = static_cast<const DLPackExchangeAPI *>(PyCapsule_GetPointer(cap, "dlpack_exchange_api"));
    Py_DECREF(cap);  // the table itself lives as long as the process
    if (!api) {
        PyErr_Clear();
        return nullptr;
    }
    if (api->header.version.major != 1 || api->header.version.minor < 3)
        return nullptr;
    return api->dltensor_from_py_object_no_sync;
}

TorchObjects &torch_objects() {
    static TorchObjects t;
    if (t.ready)
        return t;
    py::module_ torch = py::module_::import("torch");
    auto keep = [](py::object o) { return o.release().ptr(); };  // alive for the process
    t.tensor_type = keep(torch.attr("Tensor"));
    t.parameter_type = keep(torch.attr("nn").attr("Parameter"));
    t.strided = keep(torch.attr("strided"));
    t.dtypes[(int)DType::f32] = keep(torch.attr("float32"));
    t.dtypes[(int)DType::u8] = keep(torch.attr("uint8"));
    t.dtypes[(int)DType::i16] = keep(torch.attr("int16"));
    t.dtypes[(int)DType::i64] = keep(torch.attr("int64"));
    t.dtypes[(int)DType::f64] = keep(torch.attr("float64"));
    t.s_is_cpu = PyUnicode_InternFromString("is_cpu");
    t.s_layout = PyUnicode_InternFromString("layout");
    t.s_dtype = PyUnicode_InternFromString("dtype");
    t.s_shape = PyUnicode_InternFromString("shape");
    t.s_is_contiguous = PyUnicode_InternFromString("is_contiguous");
    t.s_data_ptr = PyUnicode_InternFromString("data_ptr");
    // a Parameter is a Tensor to torch's filler; both types publish the same table
    t.fill_dltensor = exchange_filler(t.tensor_type);
    if (t.fill_dltensor != exchange_filler(t.parameter_type))
        t.fill_dltensor = nullptr;
    t.ready = true;
    return t;
}

bool is_plain_torch_tensor(py::handle obj) {
    // nothing is a torch tensor before torch is imported (and the binding
    // never imports it itself: it builds and loads without torch)
    static bool torch_seen = false;
    if (!torch_seen) {
        if (!PyDict_GetItemString(PyImport_GetModuleDict(), "torch"))
            return false;
        torch_seen = true;
    }
    const TorchObjects &t = torch_objects();
    PyObject *type = (PyObject *)Py_TYPE(obj.ptr());
    return type == t.tensor_type || type == t.parameter_type;
}

py::object get_attr(py::handle obj, PyObject *name) {
    PyObject *r = PyObject_GetAttr(obj.ptr(), name);
    if (!r)
        throw py::error_already_set();
    return py::reinterpret_steal<py::object>(r);
}

py::object call_method(py::handle obj, PyObject *name) {
    PyObject *r = PyObject_CallMethodNoArgs(obj.ptr(), name);
    if (!r)
        throw py::error_already_set();
    return py::reinterpret_steal<py::object>(r);
}

std::string torch_dtype_name(py::handle dtype) {
    std::string s = py::str(dtype);
    return s.rfind("torch.", 0) == 0 ? s.substr(6) : s;
}

// The checks of view() on a DLTensor: where t passes, *out describes it and
// the message is empty; else the error, a TypeError where `type`.
struct Refusal {
    bool type = false;
    std::string message;
};

Refusal check_dltensor(const DLTensor &t, const Name &name, DType want, int64_t want_numel, Buffer *out) {
    auto refuse = [](bool type, std::string message) { return Refusal{type, std::move(message)}; };
    if (t.device.device_type != kDLCPU)
        return refuse(false, name.str() + " must be a CPU tensor (device type " +
                                 std::to_string(t.device.device_type) + ")");
    if (t.dtype.lanes != 1)
        return refuse(true, name.str() + " has vector lanes");
    bool ok = false;
    switch (want) {
    case DType::f32: ok = t.dtype.code == kDLFloat && t.dtype.bits == 32; break;
    case DType::u8: ok = t.dtype.code == kDLUInt && t.dtype.bits == 8; break;
    case DType::i16: ok = t.dtype.code == kDLInt && t.dtype.bits == 16; break;
    case DType::i64: ok = t.dtype.code == kDLInt && t.dtype.bits == 64; break;
    case DType::f64: ok = t.dtype.code == kDLFloat && t.dtype.bits == 64; break;
    case DType::u8_or_i16:
        ok = (t.dtype.code == kDLUInt && t.dtype.bits == 8) || (t.dtype.code == kDLInt && t.dtype.bits == 16);
        break;
    }
    if (!ok)
        return refuse(true, name.str() + " must be " + dtype_name(want) + ", got " + describe(t.dtype));
    Buffer &b = *out;
    b.elem_size = t.dtype.bits / 8;
    b.numel = 1;
    b.shape.clear();
    if (t.ndim < 0 || (t.ndim > 0 && !t.shape))
        return refuse(false, name.str() + " has no shape");
    for (int d = 0; d < t.ndim; ++d) {
        if (t.shape[d] < 0)
            return refuse(false, name.str() + " has a negative dimension");
        b.shape.push_back(t.shape[d]);
        // the byte size must fit too: kernels compute data + numel * elem_size
        if (!dq_mul_size(b.numel, t.shape[d], &b.numel) || b.numel > INT64_MAX / 8)
            return refuse(false, name.str() + " is too large to index with 64 bits");
    }
    // an empty tensor has no layout to check; strides of size-1 dimensions
    // carry no meaning
    int64_t expected_stride = 1;
    for (int d = t.ndim - 1; d >= 0 && b.numel > 0; --d) {
        if (t.strides && t.shape[d] != 1 && t.strides[d] != expected_stride)
            return refuse(false, name.str() + " must be contiguous");
        expected_stride *= t.shape[d];
    }
    if (want_numel >= 0 && b.numel != want_numel)
        return refuse(false, name.str() + " has " + std::to_string(b.numel) + " elements, expected " +
                                 std::to_string(want_numel));
    b.data = static_cast<char *>(t.data) + t.byte_offset;
    if (b.numel > 0 && !t.data)
        return refuse(false, name.str() + " has no data");
    // kernels dereference typed pointers: a misaligned one is undefined
    // behaviour (torch never exports one; other producers may)
    if (b.numel > 0 && reinterpret_cast<uintptr_t>(b.data) % b.elem_size)
        return refuse(false, name.str() + " is not aligned to its " + std::to_string(b.elem_size) +
                                 "-byte elements");
    return Refusal{};
}

// The checks of view() below, for a plain torch.Tensor or Parameter:
// through torch's DLPack exchange entry where it has one (a DLTensor filled
// in ~0.1 us against ~0.7 us for the six attribute reads and calls below,
// eight buffers a parameter a training step), and where that is refused or
// a check fails, through the attributes, whose messages name torch's terms.
Buffer torch_view(py::handle obj, const Name &name, DType want, int64_t want_numel) {
    const TorchObjects &t = torch_objects();
    if (t.fill_dltensor && t.use_fill) {
        DLTensor dl;
        if (t.fill_dltensor(obj.ptr(), &dl) == 0) {
            Buffer b;
            if (check_dltensor(dl, name, want, want_numel, &b).message.empty()) {
                // the tensor itself keeps its memory alive while a kernel runs
                b.capsule = py::reinterpret_borrow<py::object>(obj);
                return b;
            }
        } else {
            PyErr_Clear();
        }
    }
    if (get_attr(obj, t.s_is_cpu).ptr() != Py_True)
        value_error(name.str() + " must be a CPU tensor");
    if (get_attr(obj, t.s_layout).ptr() != t.strided)
        type_error(name.str() + " must be a dense (strided) tensor");
    py::object dtype = get_attr(obj, t.s_dtype);
    int elem_size = 0;
    const DType kinds[5] = {DType::f32, DType::u8, DType::i16, DType::i64, DType::f64};
    const int sizes[5] = {4, 1, 2, 8, 8};
    for (int k = 0; k < 5; ++k)
        if (dtype.ptr() == t.dtypes[(int)kinds[k]] &&
            (want == kinds[k] || (want == DType::u8_or_i16 && (kinds[k] == DType::u8 || kinds[k] == DType::i16))))
            elem_size = sizes[k];
    if (!elem_size)
        type_error(name.str() + " must be " + dtype_name(want) + ", got " + torch_dtype_name(dtype));
    Buffer b;
    b.elem_size = elem_size;
    b.numel = 1;
    py::object shape = get_attr(obj, t.s_shape);
    for (py::handle d : shape) {
        int64_t size = PyLong_AsLongLong(d.ptr());
        if (size == -1 && PyErr_Occurred())
            throw py::error_already_set();
        if (size < 0)
            value_error(name.str() + " has a negative dimension");
        b.shape.push_back(size);
        if (!dq_mul_size(b.numel, size, &b.numel) || b.numel > INT64_MAX / 8)
            value_error(name.str() + " is too large to index with 64 bits");
    }
    if (b.numel > 0 && call_method(obj, t.s_is_contiguous).ptr() != Py_True)
        value_error(name.str() + " must be contiguous");
    if (want_numel >= 0 && b.numel != want_numel)
        value_error(name.str() + " has " + std::to_string(b.numel) + " elements, expected " +
                    std::to_string(want_numel));
    py::object ptr = call_method(obj, t.s_data_ptr);
    unsigned long long address = PyLong_AsUnsignedLongLong(ptr.ptr());
    if (address == (unsigned long long)-1 && PyErr_Occurred())
        throw py::error_already_set();
    b.data = reinterpret_cast<char *>((uintptr_t)address);
    if (b.numel > 0 && !b.data)
        value_error(name.str() + " has no data");
    if (b.numel > 0 && reinterpret_cast<uintptr_t>(b.data) % b.elem_size)
        value_error(name.str() + " is not aligned to its " + std::to_string(b.elem_size) + "-byte elements");
    // the tensor itself keeps its memory alive while a kernel runs
    b.capsule = py::reinterpret_borrow<py::object>(obj);
    return b;
}

Buffer view(py::handle obj, const Name &name, DType want, int64_t want_numel = -1) {
    if (is_plain_torch_tensor(obj))
        return torch_view(obj, name, want, want_numel);
    if (!py::hasattr(obj, "__dlpack__"))
        type_error(name.str() + " must be a tensor, got " +
                   std::string(py::str(py::type::of(obj).attr("__name__"))));
    // Ask for the device first, as the DLPack protocol intends: producers
    // refuse to export some devices at all (torch's meta tensors), and that
    // is a wrong device, not a wrong type.
    if (py::hasattr(obj, "__dlpack_device__")) {
        py::object dev;
        try {
            dev = obj.attr("__dlpack_device__")();
        } catch (py::error_already_set &e) {
            value_error(name.str() + " must be a CPU tensor: " + exception_text(e));
        }
        int32_t device_type = -1;
        try {
            device_type = py::cast<int32_t>(dev[py::int_(0)]);
        } catch (std::exception &) {
            value_error(name.str() + " reported an unreadable device");
        }
        if (device_type != kDLCPU)
            value_error(name.str() + " must be a CPU tensor (device type " + std::to_string(device_type) + ")");
    }
    py::object cap;
    try {
        cap = obj.attr("__dlpack__")();
    } catch (py::error_already_set &e) {
        type_error(name.str() + " cannot be read as a buffer: " + exception_text(e));
    }
    if (!PyCapsule_IsValid(cap.ptr(), "dltensor"))
        type_error(name.str() + " did not export a DLPack tensor");
    auto *managed = static_cast<DLManagedTensor *>(PyCapsule_GetPointer(cap.ptr(), "dltensor"));
    const DLTensor &t = managed->dl_tensor;
    Buffer b;
    Refusal refused = check_dltensor(t, name, want, want_numel, &b);
    if (!refused.message.empty()) {
        if (refused.type)
            type_error(refused.message);
        value_error(refused.message);
    }
    b.capsule = std::move(cap);
    return b;
}

// The weight-sized outputs of a training step (noisy weights, logit and
// size gradients) are fresh allocations the kernel touches first: asking
// for transparent huge pages there turns thousands of page faults into a
// few (torch's own THP_MEM_ALLOC_ENABLE does the same). Measured on a
// 64 MiB output: ~1.6x faster noise forward, a 20% faster training step;
// now and then a fault waits for the kernel to compact memory. On the
// state paths (quantize, unpack, split) it measured slower, so they do not
// ask. Only buffers of 32 MiB and more: glibc always maps those afresh (its
// mmap threshold stops growing there), while smaller ones are mostly reused
// heap memory with no faults to save, where the advice measured 1.8x slower
// (LSTM, 16 MiB weights). Advice only; DIFFQ_C_NO_HUGEPAGES=1 turns it off.
void advise_huge_pages(const Buffer &b) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    static const bool enabled = [] {
        const char *off = std::getenv("DIFFQ_C_NO_HUGEPAGES");
        return off == nullptr || off[0] == '\0' || std::string(off) == "0";
    }();
    if (!enabled || (uint64_t)b.numel * (uint64_t)b.elem_size < ((uint64_t)32 << 20))
        return;
    const uintptr_t huge = (uintptr_t)1 << 21;
    uintptr_t begin = (reinterpret_cast<uintptr_t>(b.data) + huge - 1) & ~(huge - 1);
    uintptr_t end = (reinterpret_cast<uintptr_t>(b.data) + (uintptr_t)b.numel * (uintptr_t)b.elem_size) & ~(huge - 1);
    if (b.numel > 0 && end > begin)
        madvise(reinterpret_cast<void *>(begin), end - begin, MADV_HUGEPAGE);
#else
    (void)b;
#endif
}

void no_overlap(const Buffer &a, const char *an, const Buffer &b, const char *bn) {
    const char *a0 = a.data, *a1 = a.data + a.numel * a.elem_size;
    const char *b0 = b.data, *b1 = b.data + b.numel * b.elem_size;
    if (a.numel && b.numel && a0 < b1 && b0 < a1)
        value_error(std::string(an) + " must not overlap " + bn);
}

// OpenMP starts as many threads as asked; an absurd count would abort the
// process when thread creation fails.
constexpr int kMaxThreads = 1024;

int threads(int nthreads) {
    if (nthreads < 1 || nthreads > kMaxThreads)
        value_error("nthreads must be in 1.." + std::to_string(kMaxThreads) + ", got " + std::to_string(nthreads));
    return nthreads;
}

void finite(float x, const char *name) {
    if (!std::isfinite(x))
        value_error(std::string(name) + " must be finite, got " + std::to_string(x));
}

// The message of a dq_validate_levels failure, naming the offending entry.
[[noreturn]] void levels_error(int err, int64_t where, const Buffer &levels, const Buffer &bits,
                               int64_t group_size, const char *levels_name) {
    const uint8_t *bp = reinterpret_cast<const uint8_t *>(bits.data);
    if (err == DQ_ERR_BITS)
        value_error("bits[" + std::to_string(where) + "] = " + std::to_string(bp[where]) + " is outside 1..15");
    if (err == DQ_ERR_LEVEL_BYTES)
        type_error(std::string(levels_name) + " is uint8 but a group has " + std::to_string(bp[where]) + " bits");
    if (err == DQ_ERR_LEVEL) {
        int64_t gs = group_size ? group_size : levels.numel;
        int v = levels.elem_size == 1 ? reinterpret_cast<const uint8_t *>(levels.data)[where]
                                      : reinterpret_cast<const int16_t *>(levels.data)[where];
        value_error(std::string(levels_name) + "[" + std::to_string(where) + "] = " + std::to_string(v) +
                    " does not fit in " + std::to_string(bp[where / gs]) + " bits");
    }
    value_error(std::string(levels_name) + ": " + dq_error_message(err));
}

int noise_kind(int kind) {
    if (kind != DQ_NOISE_UNIFORM && kind != DQ_NOISE_GAUSSIAN)
        value_error("noise kind must be 0 (uniform) or 1 (gaussian), got " + std::to_string(kind));
    return kind;
}

// (mode, min_bits, max_bits, log_min_noise, log_max_noise)
dq_bits_param bits_param(const std::tuple<int, float, float, float, float> &t) {
    dq_bits_param prm;
    prm.mode = std::get<0>(t);
    prm.min_bits = std::get<1>(t);
    prm.max_bits = std::get<2>(t);
    prm.log_min_noise = std::get<3>(t);
    prm.log_max_noise = std::get<4>(t);
    if (prm.mode != DQ_PARAM_BITS && prm.mode != DQ_PARAM_NOISE)
        value_error("param mode must be 0 (bits) or 1 (noise)");
    return prm;
}

int64_t groups_of(int64_t n, int64_t group_size, const Name &what) {
    if (group_size < 0)
        value_error(std::string("group_size must be >= 0, got ") + std::to_string(group_size));
    if (group_size == 0)
        return 1;
    if (n % group_size)
        value_error(what.str() + " has " + std::to_string(n) + " elements, not a multiple of group_size " +
                    std::to_string(group_size));
    return n / group_size;
}

std::tuple<uint32_t, uint32_t, uint32_t, uint32_t> philox(std::tuple<uint32_t, uint32_t, uint32_t, uint32_t> ctr,
                                                          std::tuple<uint32_t, uint32_t> key) {
    uint32_t c[4] = {std::get<0>(ctr), std::get<1>(ctr), std::get<2>(ctr), std::get<3>(ctr)};
    uint32_t k[2] = {std::get<0>(key), std::get<1>(key)};
    uint32_t o[4];
    dq_philox4x32_10(c, k, o);
    return {o[0], o[1], o[2], o[3]};
}

void noise_fill(py::handle out_obj, int kind, uint64_t seed, int64_t start, int nthreads, bool reference) {
    Buffer out = view(out_obj, "out", DType::f32);
    noise_kind(kind);
    threads(nthreads);
    if (start < 0 || start > INT64_MAX - out.numel)
        value_error("start must be in 0..2^63 - 1 - out.numel(), got " + std::to_string(start));
    float *o = reinterpret_cast<float *>(out.data);
    py::gil_scoped_release nogil;
    if (reference)
        dq_noise_fill_ref(kind, seed, start, out.numel, o);
    else if (start == 0)
        dq_noise_fill(kind, seed, out.numel, o, nthreads);
    else
        dq_noise_fill_fast(kind, seed, start, out.numel, o);
}

std::tuple<float, float, int64_t> value_range(py::handle x_obj, int nthreads) {
    Buffer x = view(x_obj, "x", DType::f32);
    threads(nthreads);
    dq_range r;
    {
        py::gil_scoped_release nogil;
        dq_range_all(reinterpret_cast<const float *>(x.data), x.numel, &r, nthreads);
    }
    return {r.min, r.max, r.nonfinite};
}

// (min, max, ties at min, ties at max, non-finite count, first index of min, of max)
using RangeTuple = std::tuple<float, float, int64_t, int64_t, int64_t, int64_t, int64_t>;

RangeTuple noise_forward(py::handle p_obj, py::handle logit_obj, py::handle noisy_obj, int64_t group_size, int kind,
                         uint64_t seed, std::tuple<int, float, float, float, float> prm_t, int nthreads) {
    Buffer p = view(p_obj, "p", DType::f32);
    int64_t ngroups = groups_of(p.numel, group_size, "p");
    Buffer logit = view(logit_obj, "logit", DType::f32, ngroups);
    Buffer noisy = view(noisy_obj, "noisy", DType::f32, p.numel);
    advise_huge_pages(noisy);
    no_overlap(noisy, "noisy", p, "p");
    no_overlap(noisy, "noisy", logit, "logit");
    noise_kind(kind);
    threads(nthreads);
    dq_bits_param prm = bits_param(prm_t);
    dq_range r;
    int err;
    {
        py::gil_scoped_release nogil;
        err = dq_noise_forward(&prm, reinterpret_cast<const float *>(p.data), p.numel,
                               reinterpret_cast<const float *>(logit.data), group_size, kind, seed,
                               reinterpret_cast<float *>(noisy.data), &r, nthreads);
    }
    if (err == DQ_ERR_NOMEM)
        throw std::bad_alloc();
    return {r.min, r.max, r.count_min, r.count_max, r.nonfinite, r.first_min, r.first_max};
}

// A range tuple from a noise forward, checked against the n values of p.
dq_range range_of(const RangeTuple &range, int64_t n, const std::string &name) {
    dq_range r;
    r.min = std::get<0>(range);
    r.max = std::get<1>(range);
    r.count_min = std::get<2>(range);
    r.count_max = std::get<3>(range);
    r.nonfinite = std::get<4>(range);
    r.first_min = std::get<5>(range);
    r.first_max = std::get<6>(range);
    if (r.count_min < 0 || r.count_max < 0 || r.count_min > n || r.count_max > n)
        value_error(name + " counts out of bounds");
    // the kernel reads p at these (after checking they hold min and max)
    if (r.first_min < -1 || r.first_max < -1 || r.first_min >= n || r.first_max >= n)
        value_error(name + " indices out of bounds");
    return r;
}

// grad_p None: the gradient for p is written into grad itself (only the
// extrema change), which saves a pass and a weight-sized buffer.
void noise_backward(py::handle grad_obj, py::handle p_obj, py::handle logit_obj, py::object grad_p_obj,
                    py::handle grad_logit_obj, int64_t group_size, int kind, uint64_t seed,
                    std::tuple<int, float, float, float, float> prm_t, RangeTuple range, int nthreads) {
    Buffer p = view(p_obj, "p", DType::f32);
    int64_t ngroups = groups_of(p.numel, group_size, "p");
    Buffer grad = view(grad_obj, "grad", DType::f32, p.numel);
    Buffer logit = view(logit_obj, "logit", DType::f32, ngroups);
    Buffer grad_logit = view(grad_logit_obj, "grad_logit", DType::f32, ngroups);
    advise_huge_pages(grad_logit);
    const bool in_place = grad_p_obj.is_none();
    Buffer grad_p = in_place ? view(grad_obj, "grad", DType::f32, p.numel)
                             : view(grad_p_obj, "grad_p", DType::f32, p.numel);
    if (in_place) {
        no_overlap(grad, "grad", p, "p");
        no_overlap(grad, "grad", logit, "logit");
    } else {
        no_overlap(grad_p, "grad_p", grad, "grad");
        no_overlap(grad_p, "grad_p", p, "p");
        no_overlap(grad_p, "grad_p", logit, "logit");
    }
    no_overlap(grad_logit, "grad_logit", grad, "grad");
    no_overlap(grad_logit, "grad_logit", p, "p");
    no_overlap(grad_logit, "grad_logit", logit, "logit");
    no_overlap(grad_logit, "grad_logit", grad_p, "grad_p");
    noise_kind(kind);
    threads(nthreads);
    dq_bits_param prm = bits_param(prm_t);
    dq_range r = range_of(range, p.numel, "range");
    int err;
    {
        py::gil_scoped_release nogil;
        err = dq_noise_backward(&prm, reinterpret_cast<const float *>(grad.data),
                                reinterpret_cast<const float *>(p.data), p.numel,
                                reinterpret_cast<const float *>(logit.data), group_size, kind, seed, &r,
                                reinterpret_cast<float *>(grad_p.data), reinterpret_cast<float *>(grad_logit.data),
                                nthreads);
    }
    if (err == DQ_ERR_NOMEM)
        throw std::bad_alloc();
}

void logit_to_step(py::handle logit_obj, py::handle bits_obj, py::handle step_obj, py::handle dstep_obj,
                   std::tuple<int, float, float, float, float> prm_t) {
    Buffer logit = view(logit_obj, "logit", DType::f32);
    Buffer bits = view(bits_obj, "bits", DType::f32, logit.numel);
    Buffer step = view(step_obj, "step", DType::f32, logit.numel);
    Buffer dstep = view(dstep_obj, "dstep", DType::f32, logit.numel);
    no_overlap(bits, "bits", logit, "logit");
    no_overlap(step, "step", logit, "logit");
    no_overlap(dstep, "dstep", logit, "logit");
    no_overlap(bits, "bits", step, "step");
    no_overlap(bits, "bits", dstep, "dstep");
    no_overlap(step, "step", dstep, "dstep");
    dq_bits_param prm = bits_param(prm_t);
    py::gil_scoped_release nogil;
    dq_logit_to_step_ref(&prm, reinterpret_cast<const float *>(logit.data), logit.numel,
                         reinterpret_cast<float *>(bits.data), reinterpret_cast<float *>(step.data),
                         reinterpret_cast<float *>(dstep.data));
}

void quantize(py::handle p_obj, py::handle bits_obj, py::handle levels_obj, int64_t group_size, float mn,
              float range, int nthreads, bool reference) {
    Buffer p = view(p_obj, "p", DType::f32);
    int64_t ngroups = groups_of(p.numel, group_size, "p");
    Buffer bits = view(bits_obj, "bits", DType::u8, ngroups);
    Buffer levels = view(levels_obj, "levels", DType::u8_or_i16, p.numel);
    no_overlap(levels, "levels", p, "p");
    no_overlap(levels, "levels", bits, "bits");
    threads(nthreads);
    finite(mn, "mn");
    finite(range, "range");
    const uint8_t *bp = reinterpret_cast<const uint8_t *>(bits.data);
    int64_t where;
    int err = dq_validate_levels(nullptr, levels.elem_size, p.numel, group_size, bp, ngroups, &where);
    if (err != DQ_OK)
        levels_error(err, where, levels, bits, group_size, "levels");
    const float *pp = reinterpret_cast<const float *>(p.data);
    py::gil_scoped_release nogil;
    if (reference)
        dq_quantize_ref(pp, group_size ? group_size : (p.numel ? p.numel : 1), bp, mn, range, 0, p.numel,
                        levels.data, levels.elem_size);
    else
        dq_quantize(pp, p.numel, group_size, bp, mn, range, levels.data, levels.elem_size, nthreads);
}

void dequantize(py::handle levels_obj, py::handle bits_obj, py::handle out_obj, int64_t group_size, float mn,
                float range, int nthreads, bool reference) {
    Buffer levels = view(levels_obj, "levels", DType::u8_or_i16);
    int64_t ngroups = groups_of(levels.numel, group_size, "levels");
    Buffer bits = view(bits_obj, "bits", DType::u8, ngroups);
    Buffer out = view(out_obj, "out", DType::f32, levels.numel);
    no_overlap(out, "out", levels, "levels");
    no_overlap(out, "out", bits, "bits");
    threads(nthreads);
    finite(mn, "mn");
    finite(range, "range");
    const uint8_t *bp = reinterpret_cast<const uint8_t *>(bits.data);
    int64_t where;
    int err;
    {
        // the same checks as the fuzz target: levels come from untrusted states
        py::gil_scoped_release nogil;
        err = dq_validate_levels(levels.data, levels.elem_size, levels.numel, group_size, bp, ngroups, &where);
    }
    if (err != DQ_OK)
        levels_error(err, where, levels, bits, group_size, "levels");
    float *o = reinterpret_cast<float *>(out.data);
    py::gil_scoped_release nogil;
    if (reference)
        dq_dequantize_ref(levels.data, levels.elem_size, group_size ? group_size : (levels.numel ? levels.numel : 1),
                          bp, mn, range, 0, levels.numel, o);
    else
        dq_dequantize(levels.data, levels.elem_size, levels.numel, group_size, bp, mn, range, o, nthreads);
}

// What dequantize checks, without writing: levels of a state can be vetted
// for every parameter before any of them is restored.
void validate_levels(py::handle levels_obj, py::handle bits_obj, int64_t group_size) {
    Buffer levels = view(levels_obj, "levels", DType::u8_or_i16);
    int64_t ngroups = groups_of(levels.numel, group_size, "levels");
    Buffer bits = view(bits_obj, "bits", DType::u8, ngroups);
    const uint8_t *bp = reinterpret_cast<const uint8_t *>(bits.data);
    int64_t where;
    int err;
    {
        py::gil_scoped_release nogil;
        err = dq_validate_levels(levels.data, levels.elem_size, levels.numel, group_size, bp, ngroups, &where);
    }
    if (err != DQ_OK)
        levels_error(err, where, levels, bits, group_size, "levels");
}

void pack_bits(py::handle x_obj, py::handle out_obj, int nbits, int nthreads, bool reference) {
    Buffer x = view(x_obj, "x", DType::i16);
    if (nbits < 0 || nbits > 16)
        value_error("nbits must be in 0..16, got " + std::to_string(nbits));
    int64_t lines = dq_pack_lines(x.numel), words;
    if (!dq_mul_size(lines, (int64_t)nbits * DQ_PACK_BLOCK, &words))
        value_error("x is too large to pack");
    Buffer out = view(out_obj, "out", DType::i64, words);
    no_overlap(out, "out", x, "x");
    threads(nthreads);
    // values must fit in nbits: the packed layout would silently drop bits
    const uint16_t *xv = reinterpret_cast<const uint16_t *>(x.data);
    if (nbits >= 1 && nbits <= 15) {
        // the parallel level check, the whole buffer as one group of nbits
        const uint8_t width = (uint8_t)nbits;
        int64_t bad;
        {
            py::gil_scoped_release nogil;
            bad = dq_check_levels(x.data, 2, x.numel, 0, &width);
        }
        if (bad >= 0)
            value_error("x[" + std::to_string(bad) + "] = " +
                        std::to_string(reinterpret_cast<const int16_t *>(xv)[bad]) + " does not fit in " +
                        std::to_string(nbits) + " bits");
    }
    for (int64_t i = 0; i < x.numel && nbits == 0; ++i)
        if (xv[i])
            value_error("x[" + std::to_string(i) + "] = " + std::to_string(reinterpret_cast<const int16_t *>(xv)[i]) +
                        " does not fit in " + std::to_string(nbits) + " bits");
    auto *o = reinterpret_cast<uint64_t *>(out.data);
    py::gil_scoped_release nogil;
    if (reference)
        dq_pack_bits_ref(reinterpret_cast<const int16_t *>(x.data), x.numel, nbits, 0, lines, o);
    else
        dq_pack_bits(reinterpret_cast<const int16_t *>(x.data), x.numel, nbits, o, nthreads);
}

void unpack_bits(py::handle packed_obj, py::handle out_obj, int nthreads, bool reference) {
    Buffer packed = view(packed_obj, "packed", DType::i64);
    if (packed.shape.size() != 3 || packed.shape[2] != DQ_PACK_BLOCK)
        value_error("packed must have shape [lines, nbits, 32]");
    int64_t lines = packed.shape[0];
    int64_t nbits = packed.shape[1];
    Buffer out = view(out_obj, "out", DType::i16);
    // the same checks as the fuzz target
    int err = dq_validate_packed(lines, nbits, packed.shape[2], packed.numel, out.numel);
    if (err == DQ_ERR_NBITS)
        value_error("packed holds " + std::to_string(nbits) + " bit planes, at most 16 are supported");
    if (err == DQ_ERR_PACK_SHORT)
        value_error("packed holds " + std::to_string(lines * DQ_PACK_LINE) + " values, " +
                    std::to_string(out.numel) + " were asked for");
    if (err != DQ_OK)
        value_error(std::string("packed: ") + dq_error_message(err));
    no_overlap(out, "out", packed, "packed");
    threads(nthreads);
    const auto *pw = reinterpret_cast<const uint64_t *>(packed.data);
    auto *o = reinterpret_cast<int16_t *>(out.data);
    py::gil_scoped_release nogil;
    if (reference)  // only the lines that hold the values asked for (see dq_unpack_bits)
        dq_unpack_bits_ref(pw, lines, (int)nbits, 0, std::min(lines, dq_pack_lines(out.numel)), out.numel, o);
    else
        dq_unpack_bits(pw, lines, (int)nbits, out.numel, o, nthreads);
}

// ---- levels split by bit width, stored bits, requantization

// Widths 1..15 for every group (what the split and merge index by).
void check_widths(const Buffer &bits, const char *name) {
    // the widths alone, one value a group: the kernels' own check
    int64_t where;
    if (dq_validate_levels(nullptr, 2, bits.numel, 1, reinterpret_cast<const uint8_t *>(bits.data), bits.numel,
                           &where) != DQ_OK)
        value_error(std::string(name) + " holds a width outside 1..15");
}

// The buffers of an entry point that maps a per-group input (rows of
// group_size) to an output of the same size through per-group widths:
// checked here once for all of them.
struct WidthCall {
    Buffer in, bits, out;
    int64_t ngroups;
};

WidthCall width_call(py::handle in_obj, const char *in_name, DType in_type, py::handle bits_obj,
                     py::handle out_obj, const char *out_name, DType out_type, int64_t group_size, int nthreads) {
    WidthCall c;
    c.in = view(in_obj, in_name, in_type);
    if (group_size < 1)
        value_error("group_size must be >= 1, got " + std::to_string(group_size));
    c.ngroups = groups_of(c.in.numel, group_size, in_name);
    c.bits = view(bits_obj, "bits", DType::u8, c.ngroups);
    c.out = view(out_obj, out_name, out_type, c.in.numel);
    no_overlap(c.out, out_name, c.in, in_name);
    no_overlap(c.out, out_name, c.bits, "bits");
    threads(nthreads);
    check_widths(c.bits, "bits");
    return c;
}

std::vector<int64_t> split_by_width(py::handle levels_obj, py::handle bits_obj, py::handle streams_obj,
                                    int64_t group_size, int nthreads) {
    WidthCall c = width_call(levels_obj, "levels", DType::u8_or_i16, bits_obj, streams_obj, "streams", DType::i16,
                             group_size, nthreads);
    std::vector<int64_t> totals(16);
    int err;
    {
        py::gil_scoped_release nogil;
        err = dq_split_by_width(c.in.data, c.in.elem_size, group_size, reinterpret_cast<const uint8_t *>(c.bits.data),
                                c.ngroups, reinterpret_cast<int16_t *>(c.out.data), totals.data(), nthreads);
    }
    if (err == DQ_ERR_NOMEM)
        throw std::bad_alloc();
    return totals;
}

void merge_by_width(py::handle streams_obj, py::handle bits_obj, py::handle levels_obj, int64_t group_size,
                    int nthreads) {
    WidthCall c = width_call(streams_obj, "streams", DType::i16, bits_obj, levels_obj, "levels", DType::i16,
                             group_size, nthreads);
    int err;
    {
        py::gil_scoped_release nogil;
        err = dq_merge_by_width(reinterpret_cast<const int16_t *>(c.in.data), group_size,
                                reinterpret_cast<const uint8_t *>(c.bits.data), c.ngroups,
                                reinterpret_cast<int16_t *>(c.out.data), nthreads);
    }
    if (err == DQ_ERR_NOMEM)
        throw std::bad_alloc();
}

// Values of each width 1..15 (group_size times its groups), from bits
// already checked; the kernel runs without the GIL.
void width_counts(const Buffer &bits, int64_t ngroups, int64_t group_size, int nthreads, int64_t totals[16]) {
    int err;
    {
        py::gil_scoped_release nogil;
        err = dq_width_totals(reinterpret_cast<const uint8_t *>(bits.data), ngroups, group_size, totals, nthreads);
    }
    if (err == DQ_ERR_NOMEM)
        throw std::bad_alloc();
}

// What quantize_pack and dequantize_packed share: the float values, their
// widths (one per group, 1..15), a list of one packed buffer per width
// (16 entries) and how many values each width has.
struct PackCall {
    Buffer values, bits;
    int64_t ngroups;
    int64_t totals[16];
};

PackCall pack_call(py::handle values_obj, const char *values_name, py::handle bits_obj, const char *bits_name,
                   py::sequence packs, const char *packs_name, int64_t group_size, int nthreads) {
    PackCall c;
    c.values = view(values_obj, values_name, DType::f32);
    if (group_size < 1)
        value_error("group_size must be >= 1, got " + std::to_string(group_size));
    c.ngroups = groups_of(c.values.numel, group_size, values_name);
    c.bits = view(bits_obj, bits_name, DType::u8, c.ngroups);
    threads(nthreads);
    check_widths(c.bits, bits_name);
    if (py::len(packs) != 16)
        value_error(std::string(packs_name) + " must have 16 entries (one per width), got " +
                    std::to_string(py::len(packs)));
    width_counts(c.bits, c.ngroups, group_size, nthreads, c.totals);
    return c;
}

// out = levels dequantized straight from per-width packs: packs[w] is an
// int64 [lines, w, 32] buffer with the lines width w's values need, or None
// where no group has width w (packs has 16 entries).
void dequantize_packed(py::sequence packs_obj, py::handle bits_obj, py::handle out_obj, int64_t group_size, float mn,
                       float range, int nthreads) {
    finite(mn, "mn");
    finite(range, "range");
    PackCall c = pack_call(out_obj, "out", bits_obj, "bits", packs_obj, "packs", group_size, nthreads);
    const Buffer &out = c.values, &bits = c.bits;
    const int64_t *totals = c.totals;
    no_overlap(out, "out", bits, "bits");
    std::vector<Buffer> packs(16);
    const uint64_t *ptrs[16] = {nullptr};
    int64_t lines[16] = {0};
    for (int w = 1; w < 16; ++w) {
        py::handle o = packs_obj[w];
        std::string name = "packs[" + std::to_string(w) + "]";
        if (totals[w] == 0)
            continue;  // not read: whatever it holds
        if (o.is_none())
            value_error(name + " is None but " + std::to_string(totals[w]) + " values have " + std::to_string(w) +
                        " bits");
        packs[w] = view(o, name.c_str(), DType::i64);
        const Buffer &b = packs[w];
        if (b.shape.size() != 3 || b.shape[1] != w || b.shape[2] != DQ_PACK_BLOCK)
            value_error(name + " must have shape [lines, " + std::to_string(w) + ", 32]");
        if (b.shape[0] < dq_pack_lines(totals[w]))
            value_error(name + " holds " + std::to_string(b.shape[0]) + " lines, " + std::to_string(totals[w]) +
                        " values need " + std::to_string(dq_pack_lines(totals[w])));
        no_overlap(out, "out", b, name.c_str());
        ptrs[w] = reinterpret_cast<const uint64_t *>(b.data);
        lines[w] = b.shape[0];
    }
    int err;
    {
        py::gil_scoped_release nogil;
        err = dq_dequantize_packed(ptrs, lines, group_size, reinterpret_cast<const uint8_t *>(bits.data), c.ngroups,
                                   mn, range, reinterpret_cast<float *>(out.data), nthreads);
    }
    if (err == DQ_ERR_NOMEM)
        throw std::bad_alloc();
    if (err != DQ_OK)
        value_error(std::string("packs: ") + dq_error_message(err));
}

// widths = stored + offset as uint8, each 1..15; returns the count of each width
std::vector<int64_t> widths_from_stored(py::handle stored_obj, int offset, py::handle widths_obj, int nthreads) {
    Buffer stored = view(stored_obj, "stored", DType::i16);
    Buffer widths = view(widths_obj, "widths", DType::u8, stored.numel);
    no_overlap(widths, "widths", stored, "stored");
    threads(nthreads);
    if (offset < -32768 || offset > 32767)
        value_error("offset out of range: " + std::to_string(offset));
    std::vector<int64_t> counts(16);
    int64_t bad;
    {
        py::gil_scoped_release nogil;
        bad = dq_widths_from_stored(reinterpret_cast<const int16_t *>(stored.data), stored.numel, offset,
                                    reinterpret_cast<uint8_t *>(widths.data), counts.data(), nthreads);
    }
    if (bad >= 0)
        value_error("stored bits[" + std::to_string(bad) + "] + " + std::to_string(offset) + " = " +
                    std::to_string(reinterpret_cast<const int16_t *>(stored.data)[bad] + offset) +
                    " is outside 1..15");
    return counts;
}

std::vector<int64_t> width_totals(py::handle bits_obj, int64_t group_size, int nthreads) {
    Buffer bits = view(bits_obj, "bits", DType::u8);
    if (group_size < 1)
        value_error("group_size must be >= 1, got " + std::to_string(group_size));
    threads(nthreads);
    int64_t n;
    if (!dq_mul_size(bits.numel, group_size, &n))
        value_error("bits times group_size overflows");
    check_widths(bits, "bits");
    std::vector<int64_t> totals(16);
    width_counts(bits, bits.numel, group_size, nthreads, totals.data());
    return totals;
}

// Levels of p straight into one packed buffer per width: outs[w] must be
// an int64 buffer of dq_pack_lines(totals[w]) * w * 32 words where width w
// has values, None where it has none (outs has 16 entries).
void quantize_pack(py::handle p_obj, py::handle bits_obj, py::sequence outs_obj, int64_t group_size, float mn,
                   float range, int nthreads) {
    finite(mn, "mn");
    finite(range, "range");
    PackCall c = pack_call(p_obj, "p", bits_obj, "bits", outs_obj, "outs", group_size, nthreads);
    const Buffer &p = c.values, &bits = c.bits;
    const int64_t *totals = c.totals;
    std::vector<Buffer> outs(16);
    uint64_t *ptrs[16] = {nullptr};
    for (int w = 0; w < 16; ++w) {
        py::handle o = outs_obj[w];
        std::string name = "outs[" + std::to_string(w) + "]";
        if (totals[w] == 0) {
            if (!o.is_none())
                value_error(name + " must be None: no group has " + std::to_string(w) + " bits");
            continue;
        }
        if (o.is_none())
            value_error(name + " is None but " + std::to_string(totals[w]) + " values have " + std::to_string(w) +
                        " bits");
        outs[w] = view(o, name.c_str(), DType::i64, dq_pack_lines(totals[w]) * w * DQ_PACK_BLOCK);
        no_overlap(outs[w], name.c_str(), p, "p");
        no_overlap(outs[w], name.c_str(), bits, "bits");
        for (int v = 1; v < w; ++v)
            if (ptrs[v])
                no_overlap(outs[w], name.c_str(), outs[v], ("outs[" + std::to_string(v) + "]").c_str());
        ptrs[w] = reinterpret_cast<uint64_t *>(outs[w].data);
    }
    int err;
    {
        py::gil_scoped_release nogil;
        err = dq_quantize_pack(reinterpret_cast<const float *>(p.data), group_size,
                               reinterpret_cast<const uint8_t *>(bits.data), c.ngroups, mn, range, ptrs, nthreads);
    }
    if (err == DQ_ERR_NOMEM)
        throw std::bad_alloc();
}

// diffq's packed bits of a state: widths - offset packed on nbits planes;
// returns nothing, refuses widths that do not fit
// Widths to pack as widths - offset on nbits planes: each must fit.
void check_width_range(const Buffer &widths, int offset, int nbits, const std::string &name) {
    const uint8_t *w = reinterpret_cast<const uint8_t *>(widths.data);
    uint8_t low = 255, high = 0;
    for (int64_t i = 0; i < widths.numel; ++i) {
        low = w[i] < low ? w[i] : low;
        high = w[i] > high ? w[i] : high;
    }
    if (widths.numel && ((int)low < offset || (nbits < 16 && ((int)high - offset) >> nbits)))
        value_error(name + " - " + std::to_string(offset) + " must lie in [0, 2^" + std::to_string(nbits) +
                    "), got [" + std::to_string((int)low - offset) + ", " + std::to_string((int)high - offset) + "]");
}

void pack_widths(py::handle widths_obj, int offset, py::handle out_obj, int nbits, int nthreads) {
    Buffer widths = view(widths_obj, "widths", DType::u8);
    if (nbits < 0 || nbits > 16)
        value_error("nbits must be in 0..16, got " + std::to_string(nbits));
    int64_t words;
    if (!dq_mul_size(dq_pack_lines(widths.numel), (int64_t)nbits * DQ_PACK_BLOCK, &words))
        value_error("widths are too large to pack");
    Buffer out = view(out_obj, "out", DType::i64, words);
    no_overlap(out, "out", widths, "widths");
    threads(nthreads);
    check_width_range(widths, offset, nbits, "widths");
    py::gil_scoped_release nogil;
    dq_pack_widths(reinterpret_cast<const uint8_t *>(widths.data), widths.numel, offset, nbits,
                   reinterpret_cast<uint64_t *>(out.data), nthreads);
}

void stored_bits(py::handle t_obj, py::handle out_obj, float min_bits, float max_bits, float extra_bits,
                 int nthreads, bool reference) {
    Buffer t = view(t_obj, "t", DType::f32);
    Buffer out = view(out_obj, "out", DType::u8, t.numel);
    no_overlap(out, "out", t, "t");
    finite(min_bits, "min_bits");
    finite(max_bits, "max_bits");
    finite(extra_bits, "extra_bits");
    threads(nthreads);
    const float *tp = reinterpret_cast<const float *>(t.data);
    auto *o = reinterpret_cast<uint8_t *>(out.data);
    py::gil_scoped_release nogil;
    if (reference)
        dq_stored_bits_ref(tp, t.numel, min_bits, max_bits, extra_bits, o);
    else
        dq_stored_bits(tp, t.numel, min_bits, max_bits, extra_bits, o, nthreads);
}

// out None: p is requantized in place
void requantize(py::handle p_obj, py::handle bits_obj, py::object out_obj, int64_t group_size, float mn,
                float range, int nthreads) {
    Buffer p = view(p_obj, "p", DType::f32);
    int64_t ngroups = groups_of(p.numel, group_size, "p");
    Buffer bits = view(bits_obj, "bits", DType::u8, ngroups);
    const bool in_place = out_obj.is_none();
    Buffer out = in_place ? view(p_obj, "p", DType::f32, p.numel) : view(out_obj, "out", DType::f32, p.numel);
    if (!in_place)
        no_overlap(out, "out", p, "p");
    no_overlap(out, "out", bits, "bits");
    threads(nthreads);
    finite(mn, "mn");
    finite(range, "range");
    int64_t where;
    int err = dq_validate_levels(nullptr, 2, p.numel, group_size, reinterpret_cast<const uint8_t *>(bits.data),
                                 ngroups, &where);
    if (err != DQ_OK)
        value_error(std::string("bits: ") + dq_error_message(err) + " (group " + std::to_string(where) + ")");
    py::gil_scoped_release nogil;
    dq_requantize(reinterpret_cast<const float *>(p.data), p.numel, group_size,
                  reinterpret_cast<const uint8_t *>(bits.data), mn, range, reinterpret_cast<float *>(out.data),
                  nthreads);
}

std::tuple<double, float> size_forward(py::handle logit_obj, std::tuple<int, float, float, float, float> prm_t,
                                       int nthreads) {
    Buffer logit = view(logit_obj, "logit", DType::f32);
    dq_bits_param prm = bits_param(prm_t);
    threads(nthreads);
    dq_size_stats st;
    {
        py::gil_scoped_release nogil;
        dq_size_forward(&prm, reinterpret_cast<const float *>(logit.data), logit.numel, &st, nthreads);
    }
    return {st.sum_bits, st.max_bits};
}

void size_backward(py::handle logit_obj, py::handle grad_obj, float scale,
                   std::tuple<int, float, float, float, float> prm_t, int nthreads) {
    Buffer logit = view(logit_obj, "logit", DType::f32);
    Buffer grad = view(grad_obj, "grad", DType::f32, logit.numel);
    advise_huge_pages(grad);
    no_overlap(grad, "grad", logit, "logit");
    dq_bits_param prm = bits_param(prm_t);
    threads(nthreads);
    py::gil_scoped_release nogil;
    dq_size_backward(&prm, reinterpret_cast<const float *>(logit.data), logit.numel, scale,
                     reinterpret_cast<float *>(grad.data), nthreads);
}

// ---- lsq.c

int lsq_bits(int bits) {
    if (bits < 1 || bits > 15)
        value_error("bits must be in 1..15, got " + std::to_string(bits));
    return bits;
}

float lsq_effective_scale(float scale, float grad_scale) { return dq_lsq_effective_scale(scale, grad_scale); }

// q and index are optional (None); returns the count of NaN levels.
int64_t lsq_forward(py::handle x_obj, float scale, int bits, py::object q_obj, py::object index_obj, int nthreads,
                    bool reference) {
    Buffer x = view(x_obj, "x", DType::f32);
    lsq_bits(bits);
    threads(nthreads);
    Buffer q, index;
    float *qp = nullptr;
    int16_t *ip = nullptr;
    if (!q_obj.is_none()) {
        q = view(q_obj, "q", DType::f32, x.numel);
        no_overlap(q, "q", x, "x");
        qp = reinterpret_cast<float *>(q.data);
    }
    if (!index_obj.is_none()) {
        index = view(index_obj, "index", DType::i16, x.numel);
        no_overlap(index, "index", x, "x");
        if (qp)
            no_overlap(index, "index", q, "q");
        ip = reinterpret_cast<int16_t *>(index.data);
    }
    const float *xp = reinterpret_cast<const float *>(x.data);
    py::gil_scoped_release nogil;
    if (reference)
        return dq_lsq_forward_ref(xp, scale, bits, 0, x.numel, qp, ip);
    return dq_lsq_forward(xp, x.numel, scale, bits, qp, ip, nthreads);
}

// grad_x is optional (None); returns the gradient for the raw scale.
// `bounds`: which clamp bounds pass the gradient (DQ_LSQ_*_INSIDE), no default:
// it is the installed torch's convention, which the caller asks torch for.
float lsq_backward(py::handle x_obj, py::handle grad_obj, float scale, int bits, int bounds,
                   float grad_scale, py::object grad_x_obj, int nthreads, bool reference) {
    Buffer x = view(x_obj, "x", DType::f32);
    Buffer grad = view(grad_obj, "grad", DType::f32, x.numel);
    lsq_bits(bits);
    if (bounds & ~(DQ_LSQ_LOW_INSIDE | DQ_LSQ_HIGH_INSIDE))
        throw py::value_error("bounds must combine LSQ_LOW_INSIDE and LSQ_HIGH_INSIDE, got " +
                              std::to_string(bounds));
    threads(nthreads);
    Buffer grad_x;
    float *gxp = nullptr;
    if (!grad_x_obj.is_none()) {
        grad_x = view(grad_x_obj, "grad_x", DType::f32, x.numel);
        no_overlap(grad_x, "grad_x", x, "x");
        no_overlap(grad_x, "grad_x", grad, "grad");
        gxp = reinterpret_cast<float *>(grad_x.data);
    }
    const float *xp = reinterpret_cast<const float *>(x.data);
    const float *gp = reinterpret_cast<const float *>(grad.data);
    py::gil_scoped_release nogil;
    if (reference)
        return (float)((double)grad_scale * dq_lsq_backward_ref(xp, gp, scale, bits, bounds, 0, x.numel, gxp));
    return dq_lsq_backward(xp, gp, x.numel, scale, bits, bounds, grad_scale, gxp, nthreads);
}


// ------------------------------------------------------ multi-tensor calls
//
// One call covers all the quantized parameters of a model: every buffer is
// checked once, the kernels run with the GIL released in one parallel
// region over all of them (csrc/multi.c). List entries are named like
// "p[3]" in errors.

std::string item_name(const char *name, size_t i) { return std::string(name) + "[" + std::to_string(i) + "]"; }

void same_length(size_t n, py::sequence s, const char *name) {
    if ((size_t)py::len(s) != n)
        value_error(std::string(name) + " has " + std::to_string(py::len(s)) + " entries, expected " +
                    std::to_string(n));
}

// Outputs must overlap no other buffer of the call (inputs may share
// memory: they are only read). Sorted by start, each output is compared
// with its neighbours only.
struct Extent {
    const char *lo, *hi;
    bool output;
    Name name;
};

void outputs_disjoint(std::vector<Extent> &extents) {
    std::vector<Extent *> live;
    for (auto &e : extents)
        if (e.hi > e.lo)
            live.push_back(&e);
    std::sort(live.begin(), live.end(), [](const Extent *a, const Extent *b) { return a->lo < b->lo; });
    // the extent reaching furthest so far, for overlaps with a long earlier one
    const Extent *reach = nullptr;
    for (const Extent *e : live) {
        if (reach && e->lo < reach->hi && (e->output || reach->output))
            value_error((e->output ? e->name : reach->name).str() + " must not overlap " +
                        (e->output ? reach->name : e->name).str());
        if (!reach || e->hi > reach->hi || (e->output && e->hi == reach->hi))
            reach = e;
    }
}

void add_extent(std::vector<Extent> &extents, const Buffer &b, bool output, Name name) {
    extents.push_back({b.data, b.data + b.numel * b.elem_size, output, name});
}

// Fields of a row of the ranges tensor the multi-tensor noise calls share:
// a noise forward's dq_range, as float64 (exact for its counts and indices).
constexpr int kRangeFields = 7;

void range_to_row(const dq_range &r, double *row) {
    row[0] = r.min;
    row[1] = r.max;
    row[2] = (double)r.count_min;
    row[3] = (double)r.count_max;
    row[4] = (double)r.nonfinite;
    row[5] = (double)r.first_min;
    row[6] = (double)r.first_max;
}

// Each tensor's seed is dq_derive_seed(seed, i); ranges (float64 [n, 7])
// receives each one's range (min, max, ties at min and max, non-finite
// count, first index of min and max), what noise_backward_multi takes.
// size_stats (float64 [n, 2], or None) receives what size_forward_multi
// gives for the logits: each one's sum of bits and largest bits. Returns
// how many tensors hold non-finite values (then nothing else is written
// but ranges): the caller's check without a pass over ranges.
int64_t noise_forward_multi(py::sequence ps, py::sequence logits, py::sequence noisys, std::vector<int64_t> group_sizes,
                         int kind, uint64_t base_seed, std::tuple<int, float, float, float, float> prm_t,
                         py::handle ranges_obj, int nthreads, py::handle size_stats_obj) {
    const size_t n = group_sizes.size();
    same_length(n, ps, "p");
    same_length(n, logits, "logit");
    same_length(n, noisys, "noisy");
    noise_kind(kind);
    threads(nthreads);
    dq_bits_param prm = bits_param(prm_t);
    Buffer ranges = view(ranges_obj, "ranges", DType::f64, (int64_t)n * kRangeFields);
    std::vector<Buffer> keep;
    keep.reserve(3 * n + 1);
    std::vector<Extent> extents;
    extents.reserve(3 * n + 2);
    add_extent(extents, ranges, true, "ranges");
    const bool sized = !size_stats_obj.is_none();
    double *stats_rows = nullptr;
    if (sized) {
        keep.push_back(view(size_stats_obj, "size_stats", DType::f64, (int64_t)n * 2));
        stats_rows = reinterpret_cast<double *>(keep.back().data);
        add_extent(extents, keep.back(), true, "size_stats");
    }
    std::vector<dq_noise_job> jobs(n);
    for (size_t i = 0; i < n; ++i) {
        const int64_t k = (int64_t)i;
        keep.push_back(view(ps[i], Name("p", k), DType::f32));
        const Buffer &p = keep.back();
        int64_t ngroups = groups_of(p.numel, group_sizes[i], Name("p", k));
        keep.push_back(view(logits[i], Name("logit", k), DType::f32, ngroups));
        const Buffer &logit = keep.back();
        keep.push_back(view(noisys[i], Name("noisy", k), DType::f32, p.numel));
        const Buffer &noisy = keep.back();
        if (noisy.shape != p.shape)
            value_error(Name("noisy", k).str() + " must have the shape of " + Name("p", k).str());
        advise_huge_pages(noisy);
        add_extent(extents, p, false, Name("p", k));
        add_extent(extents, logit, false, Name("logit", k));
        add_extent(extents, noisy, true, Name("noisy", k));
        jobs[i] = dq_noise_job{reinterpret_cast<const float *>(p.data), p.numel,
                               reinterpret_cast<const float *>(logit.data), group_sizes[i],
                               dq_derive_seed(base_seed, k), reinterpret_cast<float *>(noisy.data), {},
                               sized, {}};
    }
    outputs_disjoint(extents);
    int err;
    int64_t nonfinite = 0;
    {
        py::gil_scoped_release nogil;
        err = dq_noise_forward_multi(&prm, kind, jobs.data(), (int64_t)n, nthreads);
        double *rows = reinterpret_cast<double *>(ranges.data);
        for (size_t i = 0; i < n; ++i) {
            range_to_row(jobs[i].range, rows + i * kRangeFields);
            nonfinite += jobs[i].range.nonfinite > 0;
        }
        // what size_forward_multi gives (NaN where the forward stopped)
        for (size_t i = 0; i < n && sized; ++i) {
            stats_rows[2 * i] = err == DQ_OK ? jobs[i].size.sum_bits : NAN;
            stats_rows[2 * i + 1] = err == DQ_OK ? jobs[i].size.max_bits : NAN;
        }
    }
    if (err == DQ_ERR_NOMEM)
        throw std::bad_alloc();
    return nonfinite;
}

// noise_backward of each entry, from what noise_forward_multi gave: entry i
// is the forward's tensor index[i] (its seed dq_derive_seed(seed,
// index[i]), its range row index[i] of ranges). grad_p[i] None updates
// grad[i] in place. size_scale[i] not None adds the size penalty's gradient,
// size_scale[i] * d(bits)/d(logit), to grad_logit[i]; grad[i] may then be
// None (no gradient reached the noisy weight; grad_p[i] must be None too).
void noise_backward_multi(py::sequence grads, py::sequence ps, py::sequence logits, py::sequence grad_ps,
                          py::sequence grad_logits, std::vector<int64_t> group_sizes, int kind, uint64_t base_seed,
                          std::vector<int64_t> index, std::tuple<int, float, float, float, float> prm_t,
                          py::handle ranges_obj, int nthreads, py::object size_scales) {
    const size_t n = group_sizes.size();
    const bool sized = !size_scales.is_none();
    py::sequence scales;
    if (sized) {
        if (!py::isinstance<py::sequence>(size_scales))
            type_error("size_scale must be a sequence or None");
        scales = py::reinterpret_borrow<py::sequence>(size_scales);
        same_length(n, scales, "size_scale");
    }
    same_length(n, grads, "grad");
    same_length(n, ps, "p");
    same_length(n, logits, "logit");
    same_length(n, grad_ps, "grad_p");
    same_length(n, grad_logits, "grad_logit");
    if (index.size() != n)
        value_error("index has " + std::to_string(index.size()) + " entries, expected " + std::to_string(n));
    noise_kind(kind);
    threads(nthreads);
    dq_bits_param prm = bits_param(prm_t);
    Buffer ranges = view(ranges_obj, "ranges", DType::f64);
    if (ranges.shape.size() != 2 || ranges.shape[1] != kRangeFields)
        value_error("ranges must have shape [tensors, " + std::to_string(kRangeFields) + "]");
    const double *rows = reinterpret_cast<const double *>(ranges.data);
    std::vector<Buffer> keep;
    keep.reserve(5 * n);
    std::vector<Extent> extents;
    extents.reserve(5 * n + 1);
    add_extent(extents, ranges, false, "ranges");
    std::vector<dq_noise_grad_job> jobs(n);
    for (size_t i = 0; i < n; ++i) {
        const int64_t k = (int64_t)i;
        if (index[i] < 0 || index[i] >= ranges.shape[0])
            value_error("index[" + std::to_string(i) + "] = " + std::to_string(index[i]) + " has no row in ranges");
        keep.push_back(view(ps[i], Name("p", k), DType::f32));
        const Buffer &p = keep.back();
        int64_t ngroups = groups_of(p.numel, group_sizes[i], Name("p", k));
        bool add_size = false;
        float size_scale = 0;
        if (sized && !py::handle(scales[i]).is_none()) {
            add_size = true;
            const double value = PyFloat_AsDouble(py::handle(scales[i]).ptr());
            if (value == -1.0 && PyErr_Occurred()) {
                PyErr_Clear();
                type_error(Name("size_scale", k).str() + " must be a float or None");
            }
            size_scale = (float)value;  // NaN and inf pass, as autograd passes them
        }
        const bool has_grad = !py::handle(grads[i]).is_none();
        if (!has_grad && !add_size)
            value_error(Name("grad", k).str() + " is None without a size_scale: nothing to compute");
        const bool in_place = py::handle(grad_ps[i]).is_none();
        if (!has_grad && !in_place)
            value_error(Name("grad_p", k).str() + " must be None where grad is None");
        const Buffer *grad = nullptr;
        if (has_grad) {
            keep.push_back(view(grads[i], Name("grad", k), DType::f32, p.numel));
            grad = &keep.back();
        }
        keep.push_back(view(logits[i], Name("logit", k), DType::f32, ngroups));
        const Buffer &logit = keep.back();
        keep.push_back(view(grad_logits[i], Name("grad_logit", k), DType::f32, ngroups));
        const Buffer &grad_logit = keep.back();
        advise_huge_pages(grad_logit);
        const Buffer *grad_p = grad;
        if (!in_place) {
            keep.push_back(view(grad_ps[i], Name("grad_p", k), DType::f32, p.numel));
            grad_p = &keep.back();
            add_extent(extents, *grad_p, true, Name("grad_p", k));
        }
        if (grad)
            add_extent(extents, *grad, in_place, Name("grad", k));
        add_extent(extents, p, false, Name("p", k));
        add_extent(extents, logit, false, Name("logit", k));
        add_extent(extents, grad_logit, true, Name("grad_logit", k));
        const double *row = rows + index[i] * kRangeFields;
        RangeTuple range{(float)row[0], (float)row[1], (int64_t)row[2], (int64_t)row[3], (int64_t)row[4],
                         (int64_t)row[5], (int64_t)row[6]};
        jobs[i] = dq_noise_grad_job{grad ? reinterpret_cast<const float *>(grad->data) : nullptr,
                                    reinterpret_cast<const float *>(p.data), p.numel,
                                    reinterpret_cast<const float *>(logit.data), group_sizes[i],
                                    dq_derive_seed(base_seed, index[i]), range_of(range, p.numel, "ranges"),
                                    grad_p ? reinterpret_cast<float *>(grad_p->data) : nullptr,
                                    reinterpret_cast<float *>(grad_logit.data), add_size, size_scale, ngroups};
    }
    outputs_disjoint(extents);
    int err;
    {
        py::gil_scoped_release nogil;
        err = dq_noise_backward_multi(&prm, kind, jobs.data(), (int64_t)n, nthreads);
    }
    if (err == DQ_ERR_NOMEM)
        throw std::bad_alloc();
}

// Whether values [used, 2048) of a packed line are zeros, read off its
// words: value k * 32 + j is bit k of word j of each plane.
bool padding_is_zero(const uint64_t *line, int nbits, int64_t used) {
    for (int j = 0; j < DQ_PACK_BLOCK; ++j) {
        // the first bit k of word j whose value k * 32 + j is padding
        int64_t first = used > j ? (used - j + DQ_PACK_BLOCK - 1) / DQ_PACK_BLOCK : 0;
        if (first >= DQ_PACK_STORAGE)
            continue;
        const uint64_t padding = ~uint64_t(0) << first;
        for (int b = 0; b < nbits; ++b)
            if (line[(int64_t)b * DQ_PACK_BLOCK + j] & padding)
                return false;
    }
    return true;
}

// A packed tensor of a state: int64 [lines, nbits, 32] holding exactly the
// lines `values` values take, with zeros past them (what diffq's pack
// writes). `planes` < 0: any count of bit planes.
const uint64_t *packed_state_tensor(py::handle obj, int64_t values, int planes, const std::string &what,
                                    std::vector<Buffer> &keep, int *nbits_out) {
    keep.push_back(view(obj, what.c_str(), DType::i64));
    const Buffer &b = keep.back();
    if (b.shape.size() != 3 || b.shape[2] != DQ_PACK_BLOCK)
        value_error(what + " must be int64 [lines, nbits, 32]");
    const int64_t lines = b.shape[0], nbits = b.shape[1];
    if (planes >= 0 && nbits != planes)
        value_error(what + " has " + std::to_string(nbits) + " bit planes, expected " + std::to_string(planes));
    if (lines != dq_pack_lines(values))
        value_error(what + " has " + std::to_string(lines) + " lines, " + std::to_string(values) + " values take " +
                    std::to_string(dq_pack_lines(values)));
    int err = dq_validate_packed(lines, nbits, b.shape[2], b.numel, values);
    if (err != DQ_OK)
        value_error(what + ": " + dq_error_message(err));
    const uint64_t *data = reinterpret_cast<const uint64_t *>(b.data);
    if (lines && !padding_is_zero(data + (lines - 1) * nbits * DQ_PACK_BLOCK, (int)nbits,
                                  values - (lines - 1) * DQ_PACK_LINE))
        value_error(what + " holds non-zero values past the " + std::to_string(values) + " expected");
    *nbits_out = (int)nbits;
    return data;
}

// Restores packed DiffQuantizer states into float32 tensors: for entry i,
// packs[i] lists the packed levels of widths 1, 2, ... (None where no
// group has that width), bits[i] the packed stored widths (width - offset),
// outs[i] the parameter. Everything is checked before anything is written:
// a bad entry raises a ValueError naming names[i] and no out changes.
void restore_packed_multi(py::sequence packs_list, py::sequence bits_list, py::sequence outs,
                          std::vector<int64_t> group_sizes, int offset, std::vector<float> mns,
                          std::vector<float> ranges, std::vector<std::string> names, int nthreads) {
    const size_t n = group_sizes.size();
    same_length(n, packs_list, "packs");
    same_length(n, bits_list, "bits");
    same_length(n, outs, "out");
    if (mns.size() != n || ranges.size() != n || names.size() != n)
        value_error("mn, range and names need one entry per tensor");
    threads(nthreads);
    if (offset < 0 || offset > 15)
        value_error("offset must be in 0..15, got " + std::to_string(offset));
    struct Job {
        const uint64_t *packs[16];
        int64_t lines[16];
        std::vector<uint8_t> widths;
        float *out;
        int64_t group_size, ngroups;
    };
    std::vector<Job> jobs(n);
    std::vector<Buffer> keep;
    std::vector<Extent> extents;
    std::vector<int16_t> stored;
    for (size_t i = 0; i < n; ++i) {
        const std::string prefix = "cannot restore parameter '" + names[i] + "': ";
        Job &job = jobs[i];
        if (!std::isfinite(mns[i]) || !std::isfinite(ranges[i]) || ranges[i] < 0)
            value_error(prefix + "scales must be finite with min <= max");
        keep.push_back(view(outs[i], item_name("out", i).c_str(), DType::f32));
        const Buffer &out = keep.back();
        add_extent(extents, out, true, Name("out", (int64_t)i));
        job.out = reinterpret_cast<float *>(out.data);
        job.group_size = group_sizes[i] > 0 ? group_sizes[i] : out.numel;
        job.ngroups = groups_of(out.numel, group_sizes[i], item_name("out", i).c_str());
        int nbits = 0;
        const uint64_t *bits = packed_state_tensor(bits_list[i], job.ngroups, -1,
                                                   prefix + "the packed bits " + item_name("bits", i), keep,
                                                   &nbits);
        add_extent(extents, keep.back(), false, Name("bits", (int64_t)i));
        stored.resize((size_t)job.ngroups);
        job.widths.resize((size_t)job.ngroups);
        int64_t counts[16];
        int64_t bad;
        {
            py::gil_scoped_release nogil;
            dq_unpack_bits(bits, dq_pack_lines(job.ngroups), nbits, job.ngroups, stored.data(), 1);
            bad = dq_widths_from_stored(stored.data(), job.ngroups, offset, job.widths.data(), counts, 1);
        }
        if (bad >= 0)
            value_error(prefix + "bits outside 1..15 in the packed state");
        py::sequence packs = packs_list[i];
        const size_t given = py::len(packs);
        if (given > 15)
            value_error(prefix + std::to_string(given) + " packed level tensors, at most 15");
        std::string missing;
        for (int w = 0; w < 16; ++w) {
            job.packs[w] = nullptr;
            job.lines[w] = 0;
            if (w == 0 || counts[w] == 0)
                continue;
            if ((size_t)w > given || py::handle(packs[w - 1]).is_none()) {
                missing += (missing.empty() ? "" : ", ") + std::to_string(w);
                continue;
            }
            int64_t values = counts[w] * job.group_size;
            int planes = 0;
            job.packs[w] = packed_state_tensor(packs[w - 1], values, w,
                                               prefix + "the packed levels of " + std::to_string(w) + "-bit groups " +
                                                   item_name("packs", i) + "[" + std::to_string(w - 1) + "]",
                                               keep, &planes);
            add_extent(extents, keep.back(), false, Name("packs", (int64_t)i, w - 1));
            job.lines[w] = dq_pack_lines(values);
        }
        if (!missing.empty())
            value_error(prefix + "no packed levels for groups of [" + missing + "] bits" +
                        (counts[15] && job.packs[15] == nullptr ? " (diffq drops 15-bit groups when packing)" : ""));
    }
    outputs_disjoint(extents);
    int err = DQ_OK;
    {
        py::gil_scoped_release nogil;
        for (size_t i = 0; i < n && err == DQ_OK; ++i)
            err = dq_dequantize_packed(jobs[i].packs, jobs[i].lines, jobs[i].group_size, jobs[i].widths.data(),
                                       jobs[i].ngroups, mns[i], ranges[i], jobs[i].out, nthreads);
    }
    if (err == DQ_ERR_NOMEM)
        throw std::bad_alloc();
    if (err != DQ_OK)
        value_error(std::string("packs: ") + dq_error_message(err));
}

uint64_t derive_seed(uint64_t base, int64_t index) {
    if (index < 0)
        value_error("index must be >= 0, got " + std::to_string(index));
    return dq_derive_seed(base, index);
}

// Views of a list of logits (float32) and pointers and sizes for the kernels.
struct LogitList {
    std::vector<Buffer> bufs;
    std::vector<const float *> ptrs;
    std::vector<int64_t> sizes;
};

LogitList logit_list(py::sequence logits, const char *name) {
    LogitList l;
    const size_t n = py::len(logits);
    l.bufs.reserve(n);
    for (size_t i = 0; i < n; ++i) {
        l.bufs.push_back(view(logits[i], Name(name, (int64_t)i), DType::f32));
        l.ptrs.push_back(reinterpret_cast<const float *>(l.bufs.back().data));
        l.sizes.push_back(l.bufs.back().numel);
    }
    return l;
}

std::vector<std::tuple<double, float>> size_forward_multi(py::sequence logits,
                                                          std::tuple<int, float, float, float, float> prm_t,
                                                          int nthreads) {
    LogitList l = logit_list(logits, "logit");
    threads(nthreads);
    dq_bits_param prm = bits_param(prm_t);
    std::vector<dq_size_stats> stats(l.ptrs.size());
    int err;
    {
        py::gil_scoped_release nogil;
        err = dq_size_forward_multi(&prm, l.ptrs.data(), l.sizes.data(), (int64_t)l.ptrs.size(), stats.data(),
                                    nthreads);
    }
    if (err == DQ_ERR_NOMEM)
        throw std::bad_alloc();
    std::vector<std::tuple<double, float>> out;
    for (const auto &s : stats)
        out.emplace_back(s.sum_bits, s.max_bits);
    return out;
}

void size_backward_multi(py::sequence logits, py::sequence grads, std::vector<float> scales,
                         std::tuple<int, float, float, float, float> prm_t, int nthreads) {
    LogitList l = logit_list(logits, "logit");
    const size_t n = l.ptrs.size();
    same_length(n, grads, "grad");
    if (scales.size() != n)
        value_error("scale has " + std::to_string(scales.size()) + " entries, expected " + std::to_string(n));
    threads(nthreads);
    dq_bits_param prm = bits_param(prm_t);
    std::vector<Buffer> keep;
    keep.reserve(n);
    std::vector<float *> gptrs(n);
    std::vector<Extent> extents;
    for (size_t i = 0; i < n; ++i) {
        const Name gn("grad", (int64_t)i);
        keep.push_back(view(grads[i], gn, DType::f32, l.sizes[i]));
        advise_huge_pages(keep.back());
        gptrs[i] = reinterpret_cast<float *>(keep.back().data);
        add_extent(extents, keep.back(), true, gn);
        add_extent(extents, l.bufs[i], false, Name("logit", (int64_t)i));
    }
    outputs_disjoint(extents);
    int err;
    {
        py::gil_scoped_release nogil;
        err = dq_size_backward_multi(&prm, l.ptrs.data(), l.sizes.data(), scales.data(), gptrs.data(), (int64_t)n,
                                     nthreads);
    }
    if (err == DQ_ERR_NOMEM)
        throw std::bad_alloc();
}

// Per parameter, as one list each (a tuple per parameter cost more to
// build than to quantize a small one): min, max, non-finite values, groups
// with NaN bits, and when asked for, the values of each width 0..15 (else
// no entries).
using QuantLists = std::tuple<std::vector<float>, std::vector<float>, std::vector<int64_t>, std::vector<int64_t>,
                              std::vector<std::vector<int64_t>>>;

// Stored bits and ranges of each p (t: the sigmoid of its logits) into
// `bits`, one buffer holding each p's groups after the previous p's, then,
// when `outs` is not None and every p and logit is finite, the quantized
// values of each p into outs[out_index[i]] from element out_offset[i] on
// (small parameters share one buffer: reading a buffer here costs about a
// microsecond, as much as quantizing a small parameter). Nothing is written
// to any output otherwise.
QuantLists quantize_multi(py::sequence ps, py::sequence ts, py::handle bits_obj, py::object outs,
                          std::vector<int64_t> out_index, std::vector<int64_t> out_offset,
                          std::vector<int64_t> group_sizes, float min_bits, float max_bits, float extra_bits,
                          bool with_totals, int nthreads) {
    const size_t n = group_sizes.size();
    same_length(n, ps, "p");
    same_length(n, ts, "t");
    const bool requant = !outs.is_none();
    std::vector<Buffer> out_bufs;
    if (requant) {
        py::sequence outs_seq = py::reinterpret_borrow<py::sequence>(outs);
        if (out_index.size() != n || out_offset.size() != n)
            value_error("out_index and out_offset have " + std::to_string(out_index.size()) + " and " +
                        std::to_string(out_offset.size()) + " entries, expected " + std::to_string(n));
        const size_t nbufs = (size_t)py::len(outs_seq);
        out_bufs.reserve(nbufs);
        for (size_t k = 0; k < nbufs; ++k)
            out_bufs.push_back(view(outs_seq[k], Name("out", (int64_t)k), DType::f32));
    }
    threads(nthreads);
    finite(min_bits, "min_bits");
    finite(max_bits, "max_bits");
    finite(extra_bits, "extra_bits");
    std::vector<Buffer> keep;
    keep.reserve(2 * n);
    std::vector<Extent> extents;
    extents.reserve(3 * n + 1);
    std::vector<dq_quant_job> jobs(n);
    std::vector<int64_t> ngroups(n);
    std::vector<int64_t> bits_at(n);
    int64_t total_groups = 0;
    for (size_t i = 0; i < n; ++i) {
        const Name pn("p", (int64_t)i), tn("t", (int64_t)i);
        keep.push_back(view(ps[i], pn, DType::f32));
        const Buffer &p = keep.back();
        ngroups[i] = groups_of(p.numel, group_sizes[i], pn);
        keep.push_back(view(ts[i], tn, DType::f32, ngroups[i]));
        const Buffer &t = keep.back();
        add_extent(extents, p, false, pn);
        add_extent(extents, t, false, tn);
        bits_at[i] = total_groups;
        total_groups += ngroups[i];
        float *out = nullptr;
        if (requant) {
            const Name on("out_offset", (int64_t)i);
            const int64_t k = out_index[i], at = out_offset[i];
            if (k < 0 || (size_t)k >= out_bufs.size())
                value_error("out_index[" + std::to_string(i) + "] is " + std::to_string(k) + ", not one of the " +
                            std::to_string(out_bufs.size()) + " out buffers");
            const Buffer &ob = out_bufs[(size_t)k];
            if (at < 0 || at > ob.numel || p.numel > ob.numel - at)
                value_error(on.str() + ": " + std::to_string(p.numel) + " values from element " +
                            std::to_string(at) + " do not fit out[" + std::to_string(k) + "] of " +
                            std::to_string(ob.numel));
            out = reinterpret_cast<float *>(ob.data) + at;
            extents.push_back({reinterpret_cast<const char *>(out), reinterpret_cast<const char *>(out + p.numel),
                               true, on});
        }
        jobs[i] = dq_quant_job{reinterpret_cast<const float *>(p.data), p.numel, group_sizes[i],
                               reinterpret_cast<const float *>(t.data), nullptr, out, 0, 0, 0, 0};
    }
    const Buffer bits = view(bits_obj, Name("bits"), DType::u8, total_groups);
    add_extent(extents, bits, true, Name("bits"));
    for (size_t i = 0; i < n; ++i)
        jobs[i].bits = reinterpret_cast<uint8_t *>(bits.data) + bits_at[i];
    outputs_disjoint(extents);
    std::vector<std::vector<int64_t>> totals(with_totals ? n : 0);
    int err;
    {
        py::gil_scoped_release nogil;
        err = dq_quantize_prepare_multi(min_bits, max_bits, extra_bits, jobs.data(), (int64_t)n, nthreads);
        bool clean = true;
        for (const auto &j : jobs)
            clean = clean && !j.nonfinite && !j.nan_bits;
        if (!err && requant && clean)
            err = dq_requantize_multi(jobs.data(), (int64_t)n, nthreads);
        for (size_t i = 0; i < n && !err && with_totals && clean; ++i) {
            totals[i].assign(16, 0);
            int64_t gs = group_sizes[i] ? group_sizes[i] : jobs[i].n;
            err = dq_width_totals(jobs[i].bits, ngroups[i], gs, totals[i].data(), nthreads);
        }
    }
    if (err == DQ_ERR_NOMEM)
        throw std::bad_alloc();
    QuantLists out;
    auto &[mins, maxs, nonfinite, nan_bits, all_totals] = out;
    mins.reserve(n);
    maxs.reserve(n);
    nonfinite.reserve(n);
    nan_bits.reserve(n);
    for (const auto &j : jobs) {
        mins.push_back(j.min);
        maxs.push_back(j.max);
        nonfinite.push_back(j.nonfinite);
        nan_bits.push_back(j.nan_bits);
    }
    all_totals = std::move(totals);
    return out;
}

// quantize_pack of each entry: p[i] with widths bits[i] into outs[i] (16
// entries each), over the range (mn[i], mn[i] + range[i]).
// widths_out[i], when not None, receives bits[i] - offset packed on the
// planes its shape [lines, nbits, 32] has (diffq's packed bits of a state).
void quantize_pack_multi(py::sequence ps, py::sequence bits_list, py::sequence outs_list,
                         std::vector<int64_t> group_sizes, std::vector<float> mns, std::vector<float> ranges,
                         py::sequence widths_out, int offset, int nthreads) {
    const size_t n = group_sizes.size();
    same_length(n, ps, "p");
    same_length(n, bits_list, "bits");
    same_length(n, outs_list, "outs");
    same_length(n, widths_out, "widths_out");
    if (mns.size() != n || ranges.size() != n)
        value_error("mn and range need one entry per tensor");
    threads(nthreads);
    struct Job {
        PackCall call;
        std::vector<Buffer> outs;
        uint64_t *ptrs[16];
        Buffer widths;
        int nbits = -1;
    };
    std::vector<Job> jobs(n);
    std::vector<Extent> extents;
    for (size_t i = 0; i < n; ++i) {
        finite(mns[i], "mn");
        finite(ranges[i], "range");
        Job &job = jobs[i];
        py::sequence outs_obj = outs_list[i];
        std::string pn = item_name("p", i);
        std::string bn = item_name("bits", i), on = item_name("outs", i);
        job.call = pack_call(ps[i], pn.c_str(), bits_list[i], bn.c_str(), outs_obj, on.c_str(), group_sizes[i],
                             nthreads);
        add_extent(extents, job.call.values, false, Name("p", (int64_t)i));
        add_extent(extents, job.call.bits, false, Name("bits", (int64_t)i));
        job.outs.resize(16);
        for (int w = 0; w < 16; ++w) {
            job.ptrs[w] = nullptr;
            py::handle o = outs_obj[w];
            std::string name = item_name("outs", i) + "[" + std::to_string(w) + "]";
            const int64_t total = job.call.totals[w];
            if (total == 0) {
                if (!o.is_none())
                    value_error(name + " must be None: no group has " + std::to_string(w) + " bits");
                continue;
            }
            if (o.is_none())
                value_error(name + " is None but " + std::to_string(total) + " values have " + std::to_string(w) +
                            " bits");
            job.outs[w] = view(o, name.c_str(), DType::i64, dq_pack_lines(total) * w * DQ_PACK_BLOCK);
            add_extent(extents, job.outs[w], true, Name("outs", (int64_t)i, w));
            job.ptrs[w] = reinterpret_cast<uint64_t *>(job.outs[w].data);
        }
        if (!py::handle(widths_out[i]).is_none()) {
            std::string wn = item_name("widths_out", i);
            job.widths = view(widths_out[i], wn.c_str(), DType::i64);
            const Buffer &b = job.widths;
            if (b.shape.size() != 3 || b.shape[0] != dq_pack_lines(job.call.ngroups) || b.shape[1] > 16 ||
                b.shape[2] != DQ_PACK_BLOCK)
                value_error(wn + " must have shape [" + std::to_string(dq_pack_lines(job.call.ngroups)) +
                            ", nbits <= 16, 32]");
            job.nbits = (int)b.shape[1];
            if (offset < 0 || offset > 15)
                value_error("offset must be in 0..15, got " + std::to_string(offset));
            check_width_range(job.call.bits, offset, job.nbits, bn);
            add_extent(extents, b, true, Name("widths_out", (int64_t)i));
        }
    }
    outputs_disjoint(extents);
    int err = DQ_OK;
    {
        py::gil_scoped_release nogil;
        for (size_t i = 0; i < n && err == DQ_OK; ++i) {
            const Job &job = jobs[i];
            const uint8_t *bits = reinterpret_cast<const uint8_t *>(job.call.bits.data);
            err = dq_quantize_pack(reinterpret_cast<const float *>(job.call.values.data), group_sizes[i], bits,
                                   job.call.ngroups, mns[i], ranges[i], job.ptrs, nthreads);
            if (err == DQ_OK && job.nbits >= 0)
                dq_pack_widths(bits, job.call.ngroups, offset, job.nbits, reinterpret_cast<uint64_t *>(job.widths.data),
                               nthreads);
        }
    }
    if (err == DQ_ERR_NOMEM)
        throw std::bad_alloc();
}

}  // namespace

// Whether torch tensors' buffers are read through torch's DLPack exchange
// entry (see torch_view): 1 on where torch has one, 0 off, -1 to ask.
// Returns the setting in effect; both ways check the same (tests run both).
bool dlpack_exchange(int on) {
    TorchObjects &t = torch_objects();
    if (on >= 0)
        t.use_fill = on != 0;
    return t.use_fill && t.fill_dltensor != nullptr;
}

PYBIND11_MODULE(_C, m) {
    m.doc() = "diffq_c C kernels (validated DLPack buffers in, no torch linked)";
    m.attr("PACK_LINE") = DQ_PACK_LINE;
    m.attr("PACK_BLOCK") = DQ_PACK_BLOCK;
    m.attr("CHUNK") = DQ_CHUNK;
    m.attr("LSQ_LOW_INSIDE") = DQ_LSQ_LOW_INSIDE;
    m.attr("LSQ_HIGH_INSIDE") = DQ_LSQ_HIGH_INSIDE;
#ifdef _OPENMP
    m.attr("OPENMP") = true;
#else
    m.attr("OPENMP") = false;
#endif
    m.def("dlpack_exchange", &dlpack_exchange, py::arg("on") = -1);
    m.def("noise_forward_multi", &noise_forward_multi, py::arg("p"), py::arg("logit"), py::arg("noisy"),
          py::arg("group_size"), py::arg("kind"), py::arg("seed"), py::arg("param"), py::arg("ranges"),
          py::arg("nthreads") = 1, py::arg("size_stats") = py::none());
    m.def("noise_backward_multi", &noise_backward_multi, py::arg("grad"), py::arg("p"), py::arg("logit"),
          py::arg("grad_p"), py::arg("grad_logit"), py::arg("group_size"), py::arg("kind"), py::arg("seed"),
          py::arg("index"), py::arg("param"), py::arg("ranges"), py::arg("nthreads") = 1,
          py::arg("size_scale") = py::none());
    m.def("restore_packed_multi", &restore_packed_multi, py::arg("packs"), py::arg("bits"), py::arg("out"),
          py::arg("group_size"), py::arg("offset"), py::arg("mn"), py::arg("range"), py::arg("names"),
          py::arg("nthreads") = 1);
    m.def("derive_seed", &derive_seed, py::arg("base"), py::arg("index"));
    m.def("size_forward_multi", &size_forward_multi, py::arg("logit"), py::arg("param"), py::arg("nthreads") = 1);
    m.def("size_backward_multi", &size_backward_multi, py::arg("logit"), py::arg("grad"), py::arg("scale"),
          py::arg("param"), py::arg("nthreads") = 1);
    m.def("quantize_multi", &quantize_multi, py::arg("p"), py::arg("t"), py::arg("bits"), py::arg("out"),
          py::arg("out_index"), py::arg("out_offset"), py::arg("group_size"), py::arg("min_bits"), py::arg("max_bits"), py::arg("extra_bits"),
          py::arg("with_totals") = false, py::arg("nthreads") = 1);
    m.def("quantize_pack_multi", &quantize_pack_multi, py::arg("p"), py::arg("bits"), py::arg("outs"),
          py::arg("group_size"), py::arg("mn"), py::arg("range"), py::arg("widths_out"), py::arg("offset"),
          py::arg("nthreads") = 1);
    m.def("philox4x32_10", &philox, py::arg("ctr"), py::arg("key"));
    m.def("noise_fill", &noise_fill, py::arg("out"), py::arg("kind"), py::arg("seed"), py::arg("start") = 0,
          py::arg("nthreads") = 1, py::arg("reference") = false);
    m.def("value_range", &value_range, py::arg("x"), py::arg("nthreads") = 1);
    m.def("noise_forward", &noise_forward, py::arg("p"), py::arg("logit"), py::arg("noisy"), py::arg("group_size"),
          py::arg("kind"), py::arg("seed"), py::arg("param"), py::arg("nthreads") = 1);
    m.def("noise_backward", &noise_backward, py::arg("grad"), py::arg("p"), py::arg("logit"), py::arg("grad_p"),
          py::arg("grad_logit"), py::arg("group_size"), py::arg("kind"), py::arg("seed"), py::arg("param"),
          py::arg("range"), py::arg("nthreads") = 1);
    m.def("logit_to_step", &logit_to_step, py::arg("logit"), py::arg("bits"), py::arg("step"), py::arg("dstep"),
          py::arg("param"));
    m.def("quantize", &quantize, py::arg("p"), py::arg("bits"), py::arg("levels"), py::arg("group_size"),
          py::arg("mn"), py::arg("range"), py::arg("nthreads") = 1, py::arg("reference") = false);
    m.def("dequantize", &dequantize, py::arg("levels"), py::arg("bits"), py::arg("out"), py::arg("group_size"),
          py::arg("mn"), py::arg("range"), py::arg("nthreads") = 1, py::arg("reference") = false);
    m.def("validate_levels", &validate_levels, py::arg("levels"), py::arg("bits"), py::arg("group_size"));
    m.def("pack_bits", &pack_bits, py::arg("x"), py::arg("out"), py::arg("nbits"), py::arg("nthreads") = 1,
          py::arg("reference") = false);
    m.def("unpack_bits", &unpack_bits, py::arg("packed"), py::arg("out"), py::arg("nthreads") = 1,
          py::arg("reference") = false);
    m.def("split_by_width", &split_by_width, py::arg("levels"), py::arg("bits"), py::arg("streams"),
          py::arg("group_size"), py::arg("nthreads") = 1);
    m.def("merge_by_width", &merge_by_width, py::arg("streams"), py::arg("bits"), py::arg("levels"),
          py::arg("group_size"), py::arg("nthreads") = 1);
    m.def("widths_from_stored", &widths_from_stored, py::arg("stored"), py::arg("offset"), py::arg("widths"),
          py::arg("nthreads") = 1);
    m.def("pack_widths", &pack_widths, py::arg("widths"), py::arg("offset"), py::arg("out"), py::arg("nbits"),
          py::arg("nthreads") = 1);
    m.def("stored_bits", &stored_bits, py::arg("t"), py::arg("out"), py::arg("min_bits"), py::arg("max_bits"),
          py::arg("extra_bits"), py::arg("nthreads") = 1, py::arg("reference") = false);
    m.def("width_totals", &width_totals, py::arg("bits"), py::arg("group_size"), py::arg("nthreads") = 1);
    m.def("quantize_pack", &quantize_pack, py::arg("p"), py::arg("bits"), py::arg("outs"), py::arg("group_size"),
          py::arg("mn"), py::arg("range"), py::arg("nthreads") = 1);
    m.def("dequantize_packed", &dequantize_packed, py::arg("packs"), py::arg("bits"), py::arg("out"),
          py::arg("group_size"), py::arg("mn"), py::arg("range"), py::arg("nthreads") = 1);
    m.def("requantize", &requantize, py::arg("p"), py::arg("bits"), py::arg("out"), py::arg("group_size"),
          py::arg("mn"), py::arg("range"), py::arg("nthreads") = 1);
    m.def("size_forward", &size_forward, py::arg("logit"), py::arg("param"), py::arg("nthreads") = 1);
    m.def("size_backward", &size_backward, py::arg("logit"), py::arg("grad"), py::arg("scale"), py::arg("param"),
          py::arg("nthreads") = 1);
    m.def("lsq_effective_scale", &lsq_effective_scale, py::arg("scale"), py::arg("grad_scale"));
    m.def("lsq_forward", &lsq_forward, py::arg("x"), py::arg("scale"), py::arg("bits"), py::arg("q") = py::none(),
          py::arg("index") = py::none(), py::arg("nthreads") = 1, py::arg("reference") = false);
    m.def("lsq_backward", &lsq_backward, py::arg("x"), py::arg("grad"), py::arg("scale"), py::arg("bits"),
          py::arg("bounds"), py::arg("grad_scale"), py::arg("grad_x") = py::none(), py::arg("nthreads") = 1,
          py::arg("reference") = false);
}
