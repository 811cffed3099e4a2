// Python bindings: a thin layer over the C API in pyactadd.h, so Python exercises the
// same entry points a C application uses. Input is validated again here because the
// Python caller might not be pyactadd's own wrapper.

#include "pyactadd.h"

#include "ggml-backend.h"

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <dlfcn.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace nb = nanobind;

namespace {

using rows_array = nb::ndarray<const float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using out_rows_array = nb::ndarray<float, nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using out_positions_array = nb::ndarray<int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

// The file that defines the symbol at addr, so Python can check that the engine and
// llama_cpp share one libllama / libggml.
std::string library_of(const void * addr) {
    Dl_info info;
    if (dladdr(addr, &info) == 0 || info.dli_fname == nullptr) {
        return "";
    }
    return info.dli_fname;
}

class Engine {
  public:
    Engine(int32_t n_embd, int32_t n_layer, bool force_device_copy) {
        pyactadd_engine_params p = pyactadd_engine_default_params();
        p.n_embd = n_embd;
        p.n_layer = n_layer;
        p.force_device_copy = force_device_copy;
        engine_ = pyactadd_engine_create(p);
        if (engine_ == nullptr) {
            throw nb::value_error("invalid engine parameters: need n_embd > 0 and n_layer >= 2");
        }
        n_embd_ = n_embd;
    }
    ~Engine() { pyactadd_engine_free(engine_); }
    Engine(const Engine &) = delete;
    Engine & operator=(const Engine &) = delete;

    int32_t add(int32_t il, rows_array rows, int32_t offset, bool all_positions) {
        if (rows.shape(0) > INT32_MAX || rows.shape(1) > INT32_MAX) {
            throw nb::value_error("steering tensor too large");
        }
        const int32_t id = pyactadd_engine_add(engine_, il, rows.data(), (int32_t) rows.shape(0), (int32_t) rows.shape(1), offset,
                                               all_positions ? PYACTADD_ALIGN_ALL : PYACTADD_ALIGN_POSITIONS);
        if (id < 0) {
            throw nb::value_error(pyactadd_engine_last_error(engine_));
        }
        return id;
    }

    int32_t load_file(const std::string & path, float coeff) {
        const int32_t n = pyactadd_engine_load_file(engine_, path.c_str(), coeff);
        if (n < 0) {
            throw nb::value_error(pyactadd_engine_last_error(engine_));
        }
        return n;
    }

    void remove(int32_t id) {
        if (pyactadd_engine_remove(engine_, id) != 0) {
            throw nb::value_error(pyactadd_engine_last_error(engine_));
        }
    }

    // params_address: the address of a llama_context_params struct (ctypes.addressof).
    void attach(uintptr_t params_address) {
        if (params_address == 0) {
            throw nb::value_error("null llama_context_params address");
        }
        if (pyactadd_engine_attach(engine_, reinterpret_cast<llama_context_params *>(params_address)) != 0) {
            throw nb::value_error(pyactadd_engine_last_error(engine_));
        }
    }

    // Binds tensor id to these sequence ids (empty: every token, by position).
    void set_sequences(int32_t id, const std::vector<int32_t> & seq_ids) {
        if (seq_ids.size() > INT32_MAX) {
            throw nb::value_error("too many sequence ids");
        }
        for (int32_t s : seq_ids) {
            if (s < 0) {
                throw nb::value_error(("sequence id " + std::to_string(s) + " is negative: llama.cpp's sequence ids are 0 or more").c_str());
            }
        }
        if (pyactadd_engine_set_sequences(engine_, id, seq_ids.data(), (int32_t) seq_ids.size()) != 0) {
            throw nb::value_error(pyactadd_engine_last_error(engine_));
        }
    }

    // batch_address: the address of a llama_batch struct (ctypes.addressof), 0 to forget.
    void declare_batch(uintptr_t batch_address) {
        const auto * batch = reinterpret_cast<const llama_batch *>(batch_address);
        if (batch != nullptr && (batch->n_tokens < 1 || batch->pos == nullptr || batch->n_seq_id == nullptr || batch->seq_id == nullptr)) {
            pyactadd_engine_declare_batch(engine_, nullptr); // a refused declaration leaves none, as in C
            throw nb::value_error("declare_batch needs a llama_batch with n_tokens >= 1 and its pos, n_seq_id and seq_id "
                                  "arrays (from llama_cpp.llama_batch_init), or 0 to forget the declaration");
        }
        if (pyactadd_engine_declare_batch(engine_, batch) != 0) {
            throw nb::value_error(pyactadd_engine_last_error(engine_));
        }
    }

    void capture(const std::vector<int32_t> & layers, bool stop_after) {
        if (layers.size() > INT32_MAX) {
            throw nb::value_error("too many layers");
        }
        if (pyactadd_engine_capture(engine_, layers.data(), (int32_t) layers.size(), stop_after) != 0) {
            throw nb::value_error(pyactadd_engine_last_error(engine_));
        }
    }

    // Rows captured at il, or -1 when il is not captured.
    int32_t capture_n_rows(int32_t il) const { return pyactadd_engine_capture_n_rows(engine_, il); }

    // Copies il's rows into out [n, n_embd] and positions [n] (n <= captured rows); returns n.
    int32_t capture_read(int32_t il, out_rows_array out, out_positions_array positions) const {
        const int32_t have = pyactadd_engine_capture_n_rows(engine_, il);
        if (have < 0) {
            throw nb::value_error(("layer index il=" + std::to_string(il) + " is not captured").c_str());
        }
        if (out.shape(1) != (size_t) n_embd_ || positions.shape(0) != out.shape(0) || out.shape(0) > (size_t) have) {
            throw nb::value_error("capture_read needs rows [n, n_embd] and positions [n] with n <= the rows captured");
        }
        return pyactadd_engine_capture_read(engine_, il, out.data(), positions.data(), (int32_t) out.shape(0));
    }

    nb::dict stats() const {
        const pyactadd_engine_stats s = pyactadd_engine_get_stats(engine_);
        nb::dict d;
        d["n_layer_outputs_seen"] = s.n_layer_outputs_seen;
        d["n_layer_outputs_steered"] = s.n_layer_outputs_steered;
        d["n_rows_added"] = s.n_rows_added;
        d["n_device_copies"] = s.n_device_copies;
        d["n_errors"] = s.n_errors;
        d["n_rows_captured"] = s.n_rows_captured;
        d["n_graph_stops"] = s.n_graph_stops;
        d["n_batch_mismatches"] = s.n_batch_mismatches;
        return d;
    }

    pyactadd_engine * engine_ = nullptr;
    int32_t n_embd_ = 0;
};

// pyactadd_file_read_info as a dict with the struct's field names; ValueError on failure.
nb::dict read_file_info(const std::string & path) {
    pyactadd_file_info info;
    if (pyactadd_file_read_info(path.c_str(), &info) != 0) {
        throw nb::value_error(info.error);
    }
    static const char * const alignments[] = { "front", "back", "all" };
    nb::dict d;
    d["source"] = info.source == PYACTADD_FILE_SOURCE_PYACTADD ? "pyactadd" : "llama.cpp";
    d["alignment"] = alignments[info.alignment];
    d["anchor"] = std::string(info.anchor);
    d["anchor_token_id"] = info.anchor_token_id;
    d["has_fingerprint"] = info.has_fingerprint;
    d["model_architecture"] = std::string(info.model_architecture);
    d["model_n_embd"] = info.model_n_embd;
    d["model_n_layer"] = info.model_n_layer;
    d["model_n_vocab"] = info.model_n_vocab;
    d["n_positions"] = info.n_positions;
    nb::list layers;
    for (int32_t i = 0; i < info.n_layers; ++i) {
        layers.append(info.layers[i]);
    }
    d["layers"] = layers;
    return d;
}

} // namespace

NB_MODULE(_engine, m) {
    m.doc() = "pyactadd's C++ steering engine (see cpp/include/pyactadd.h)";
    m.attr("ABI_VERSION") = PYACTADD_ABI_VERSION;
    m.attr("STATUS_BATCH_MISMATCH") = (int) PYACTADD_STATUS_BATCH_MISMATCH;

    nb::class_<Engine>(m, "Engine")
        .def(nb::init<int32_t, int32_t, bool>(), nb::arg("n_embd"), nb::arg("n_layer"), nb::arg("force_device_copy") = false)
        .def("add", &Engine::add, nb::arg("il"), nb::arg("rows"), nb::arg("offset") = 0, nb::arg("all_positions") = false,
             "Add rows [P, n_embd] to l_out-<il>; returns an id.")
        .def("load_file", &Engine::load_file, nb::arg("path"), nb::arg("coeff") = 1.0f)
        .def("remove", &Engine::remove, nb::arg("id"))
        .def("clear", [](Engine & e) { pyactadd_engine_clear(e.engine_); })
        .def("count", [](const Engine & e) { return pyactadd_engine_count(e.engine_); })
        .def("set_force_device_copy", [](Engine & e, bool f) { pyactadd_engine_set_force_device_copy(e.engine_, f); })
        .def("attach", &Engine::attach, nb::arg("params_address"))
        .def("set_sequences", &Engine::set_sequences, nb::arg("id"), nb::arg("seq_ids"),
             "Add tensor id only to tokens whose sequences are all in seq_ids (empty: every token, by position).")
        .def("declare_batch", &Engine::declare_batch, nb::arg("batch_address"),
             "Declare the llama_batch (ctypes.addressof) the next llama_decode computes; 0 forgets it.")
        .def("batch_status", [](const Engine & e) { return pyactadd_engine_batch_status(e.engine_); },
             "0, or -3 (PYACTADD_STATUS_BATCH_MISMATCH) after a micro-batch that was not the declared batch's next tokens.")
        .def("capture", &Engine::capture, nb::arg("layers"), nb::arg("stop_after") = false,
             "Copy l_out-<il> for these il during llama_decode (empty: off); stop_after: skip the rest of the graph.")
        .def("capture_clear", [](Engine & e) { pyactadd_engine_capture_clear(e.engine_); })
        .def("capture_n_rows", &Engine::capture_n_rows, nb::arg("il"))
        .def("capture_read", &Engine::capture_read, nb::arg("il"), nb::arg("out"), nb::arg("positions"))
        .def("stats", &Engine::stats)
        .def("reset_stats", [](Engine & e) { pyactadd_engine_reset_stats(e.engine_); })
        .def("last_error", [](const Engine & e) { return std::string(pyactadd_engine_last_error(e.engine_)); });

    m.def("read_file_info", &read_file_info, nb::arg("path"),
          "What a steering file says about itself, read by the C API's pyactadd_file_read_info.");
    m.def("llama_library_path", []() { return library_of(reinterpret_cast<const void *>(&llama_model_n_embd)); },
          "The libllama file the engine is linked to at run time.");
    m.def("ggml_library_path", []() { return library_of(reinterpret_cast<const void *>(&ggml_backend_tensor_set)); },
          "The libggml-base file the engine is linked to at run time.");
    m.def("engine_library_path", []() { return library_of(reinterpret_cast<const void *>(&pyactadd_engine_create)); },
          "The libpyactadd file providing the C API.");
}
