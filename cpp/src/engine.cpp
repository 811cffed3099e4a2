// The steering engine behind pyactadd.h. See the header for the contract.
//
// Nothing here throws across the C boundary: every entry point validates its input,
// catches allocation failures and reports them through last_error.

#include "pyactadd.h"

#include "ggml-backend.h"
#include "ggml.h"
#include "gguf.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <new>
#include <string>
#include <vector>

namespace {

struct steering_tensor {
    int32_t id;
    int32_t il;
    int32_t n_rows;
    int32_t offset;
    pyactadd_align align;
    std::vector<float> rows; // n_rows * n_embd, row-major

    // The row to add at position pos, or nullptr when this tensor has none there.
    const float * row_at(int32_t pos, int32_t n_embd) const {
        if (align == PYACTADD_ALIGN_ALL) {
            return rows.data();
        }
        const int64_t r = (int64_t) pos - offset;
        if (r < 0 || r >= n_rows) {
            return nullptr;
        }
        return rows.data() + r * (int64_t) n_embd;
    }
};

// Graph input names: llama.cpp calls the positions input "inp_pos"; when the scheduler
// copies it to another backend the copy is named "<backend>#inp_pos#<n>".
bool is_positions_input(const ggml_tensor * t) {
    if (t == nullptr || t->type != GGML_TYPE_I32) {
        return false;
    }
    return std::strcmp(t->name, "inp_pos") == 0 || std::strstr(t->name, "#inp_pos#") != nullptr;
}

// Parses "l_out-<il>"; returns -1 for any other name.
int32_t layer_output_index(const char * name) {
    static const char prefix[] = "l_out-";
    if (std::strncmp(name, prefix, sizeof(prefix) - 1) != 0) {
        return -1;
    }
    const char * digits = name + sizeof(prefix) - 1;
    if (*digits == '\0') {
        return -1;
    }
    int32_t il = 0;
    for (const char * c = digits; *c; ++c) {
        if (*c < '0' || *c > '9' || il > 100000) {
            return -1;
        }
        il = il * 10 + (*c - '0');
    }
    return il;
}

bool all_finite(const float * data, size_t n) {
    for (size_t i = 0; i < n; ++i) {
        if (!std::isfinite(data[i])) {
            return false;
        }
    }
    return true;
}

struct gguf_deleter {
    void operator()(gguf_context * c) const { gguf_free(c); }
};
struct ggml_deleter {
    void operator()(ggml_context * c) const { ggml_free(c); }
};

} // namespace

struct pyactadd_engine {
    pyactadd_engine_params params;
    std::vector<steering_tensor> tensors;
    std::vector<std::vector<size_t>> by_layer; // il -> indices into tensors
    int32_t next_id = 0;

    ggml_backend_sched_eval_callback chained_cb = nullptr;
    void * chained_user_data = nullptr;

    // Per-node state between the ask=true and ask=false calls for the same node.
    const ggml_tensor * positions_input = nullptr;
    const ggml_tensor * asked_node = nullptr;
    bool we_asked = false;
    bool chained_asked = false;

    std::vector<int32_t> positions; // positions of the current micro-batch
    // Positions are the same for every layer of a graph, and on the non-host path (RPC,
    // CUDA, Metal) each read is a round trip, so they are read once per graph. The
    // callback sees l_out-0, l_out-1, ... in order, so a layer index that does not
    // exceed the last one seen means a new graph.
    bool positions_valid = false;
    int32_t last_il_seen = -1;
    std::vector<float> scratch;     // host copy of a layer output for the non-host path

    pyactadd_engine_stats stats = {};
    std::string last_error;

    void fail(const std::string & msg) {
        last_error = msg;
    }

    void rebuild_index() {
        by_layer.assign(params.n_layer, {});
        for (size_t i = 0; i < tensors.size(); ++i) {
            by_layer[tensors[i].il].push_back(i);
        }
    }

    // Reads the positions of the current micro-batch into `positions`.
    bool read_positions(int64_t n_tokens) {
        if (positions_valid && (int64_t) positions.size() == n_tokens) {
            return true;
        }
        const ggml_tensor * p = positions_input;
        if (p == nullptr || p->buffer == nullptr || ggml_nelements(p) < n_tokens) {
            fail("positions input (inp_pos) not found for this graph; is this a model llama.cpp builds with positions?");
            return false;
        }
        positions.resize(n_tokens);
        if (ggml_backend_buffer_is_host(p->buffer) && !params.force_device_copy) {
            std::memcpy(positions.data(), p->data, n_tokens * sizeof(int32_t));
        } else {
            ggml_backend_tensor_get(p, positions.data(), 0, n_tokens * sizeof(int32_t));
            stats.n_device_copies++;
        }
        positions_valid = true;
        return true;
    }

    // True when any tensor at layer il has a row for a position in this micro-batch.
    bool wants(int32_t il, const ggml_tensor * t) {
        if (il < 0 || il >= params.n_layer || by_layer[il].empty()) {
            return false;
        }
        stats.n_layer_outputs_seen++;
        if (t->type != GGML_TYPE_F32 || t->ne[0] != params.n_embd || t->nb[0] != sizeof(float)) {
            stats.n_errors++;
            fail("layer output " + std::string(t->name) + " is not an F32 [n_embd, n_tokens] tensor; skipped");
            return false;
        }
        if (!read_positions(t->ne[1])) {
            stats.n_errors++;
            return false;
        }
        for (size_t idx : by_layer[il]) {
            const steering_tensor & s = tensors[idx];
            for (int32_t pos : positions) {
                if (s.row_at(pos, params.n_embd) != nullptr) {
                    return true;
                }
            }
        }
        return false;
    }

    // Adds the rows for il into the computed layer output t (positions already read).
    void apply(int32_t il, ggml_tensor * t) {
        const int64_t n_embd = params.n_embd;
        const int64_t n_tokens = t->ne[1];
        const bool host = ggml_backend_buffer_is_host(t->buffer) && !params.force_device_copy;

        // The non-host path copies the span of token columns that get a row, once.
        int64_t first = -1, last = -1;
        for (int64_t i = 0; i < n_tokens; ++i) {
            for (size_t idx : by_layer[il]) {
                if (tensors[idx].row_at(positions[i], params.n_embd) != nullptr) {
                    if (first < 0) first = i;
                    last = i;
                    break;
                }
            }
        }
        if (first < 0) {
            return;
        }
        const size_t col_bytes = n_embd * sizeof(float);
        const size_t span_offset = first * t->nb[1];
        const size_t span_bytes = (last - first) * t->nb[1] + col_bytes;
        char * base;
        if (host) {
            base = static_cast<char *>(t->data) + span_offset;
        } else {
            scratch.resize((span_bytes + sizeof(float) - 1) / sizeof(float));
            ggml_backend_tensor_get(t, scratch.data(), span_offset, span_bytes);
            stats.n_device_copies++;
            base = reinterpret_cast<char *>(scratch.data());
        }
        for (int64_t i = first; i <= last; ++i) {
            float * col = reinterpret_cast<float *>(base + (i - first) * t->nb[1]);
            bool added = false;
            for (size_t idx : by_layer[il]) {
                const float * row = tensors[idx].row_at(positions[i], params.n_embd);
                if (row == nullptr) {
                    continue;
                }
                for (int64_t k = 0; k < n_embd; ++k) {
                    col[k] += row[k];
                }
                added = true;
            }
            stats.n_rows_added += added ? 1 : 0;
        }
        if (!host) {
            ggml_backend_tensor_set(t, scratch.data(), span_offset, span_bytes);
            stats.n_device_copies++;
        }
        stats.n_layer_outputs_steered++;
    }

    bool on_eval(ggml_tensor * t, bool ask) {
        if (ask) {
            for (int i = 0; i < GGML_MAX_SRC; ++i) {
                if (is_positions_input(t->src[i])) {
                    positions_input = t->src[i];
                    break;
                }
            }
            const int32_t il = layer_output_index(t->name);
            if (il >= 0) {
                if (il <= last_il_seen) {
                    positions_valid = false;
                }
                last_il_seen = il;
            }
            asked_node = t;
            we_asked = il >= 0 && wants(il, t);
            chained_asked = chained_cb != nullptr && chained_cb(t, true, chained_user_data);
            return we_asked || chained_asked;
        }
        if (t == asked_node && we_asked) {
            apply(layer_output_index(t->name), t);
        }
        const bool keep_going = !(t == asked_node && chained_asked) || chained_cb(t, false, chained_user_data);
        asked_node = nullptr;
        we_asked = chained_asked = false;
        return keep_going;
    }

    int32_t add(int32_t il, const float * data, int32_t n_rows, int32_t n_embd, int32_t offset, pyactadd_align align) {
        if (il < 0 || il > params.n_layer - 2) {
            fail("layer index il=" + std::to_string(il) + " out of range: use 0 to " + std::to_string(params.n_layer - 2) +
                 " (l_out-<il>, the input of block il+1)");
            return -1;
        }
        if (n_embd != params.n_embd) {
            fail("row width " + std::to_string(n_embd) + " does not match the model's n_embd " + std::to_string(params.n_embd));
            return -1;
        }
        if (data == nullptr || n_rows < 1) {
            fail("a steering tensor needs at least one row");
            return -1;
        }
        if (align != PYACTADD_ALIGN_POSITIONS && align != PYACTADD_ALIGN_ALL) {
            fail("unknown alignment " + std::to_string((int) align));
            return -1;
        }
        if (align == PYACTADD_ALIGN_ALL && n_rows != 1) {
            fail("ALIGN_ALL takes exactly one row, got " + std::to_string(n_rows));
            return -1;
        }
        if (offset < 0) {
            fail("offset must be >= 0, got " + std::to_string(offset));
            return -1;
        }
        const size_t n = (size_t) n_rows * (size_t) n_embd;
        if (!all_finite(data, n)) {
            fail("steering tensor contains NaN or inf");
            return -1;
        }
        steering_tensor s;
        s.id = next_id;
        s.il = il;
        s.n_rows = n_rows;
        s.offset = offset;
        s.align = align;
        s.rows.assign(data, data + n);
        tensors.push_back(std::move(s));
        by_layer[il].push_back(tensors.size() - 1);
        return next_id++;
    }
};

extern "C" {

pyactadd_engine_params pyactadd_engine_default_params(void) {
    pyactadd_engine_params p;
    p.n_embd = 0;
    p.n_layer = 0;
    p.force_device_copy = false;
    return p;
}

pyactadd_engine * pyactadd_engine_create(pyactadd_engine_params params) {
    if (params.n_embd <= 0 || params.n_layer < 2) {
        return nullptr;
    }
    try {
        std::unique_ptr<pyactadd_engine> e(new pyactadd_engine());
        e->params = params;
        e->rebuild_index();
        return e.release();
    } catch (...) {
        return nullptr;
    }
}

void pyactadd_engine_free(pyactadd_engine * engine) {
    delete engine;
}

int32_t pyactadd_engine_add(pyactadd_engine * engine, int32_t il, const float * data, int32_t n_rows, int32_t n_embd,
                            int32_t offset, pyactadd_align align) {
    if (engine == nullptr) {
        return -1;
    }
    try {
        engine->last_error.clear();
        return engine->add(il, data, n_rows, n_embd, offset, align);
    } catch (const std::bad_alloc &) {
        engine->fail("out of memory while copying a steering tensor");
        return -1;
    } catch (...) {
        engine->fail("unexpected error while adding a steering tensor");
        return -1;
    }
}

int32_t pyactadd_engine_load_file(pyactadd_engine * engine, const char * path, float coeff) {
    if (engine == nullptr) {
        return -1;
    }
    try {
        engine->last_error.clear();
        if (path == nullptr) {
            engine->fail("no file name given");
            return -1;
        }
        if (!std::isfinite(coeff)) {
            engine->fail("coefficient must be finite");
            return -1;
        }
        ggml_context * raw_ctx = nullptr;
        gguf_init_params gp = { /*.no_alloc =*/ false, /*.ctx =*/ &raw_ctx };
        std::unique_ptr<gguf_context, gguf_deleter> g(gguf_init_from_file(path, gp));
        std::unique_ptr<ggml_context, ggml_deleter> ctx(raw_ctx);
        if (!g || !ctx) {
            engine->fail(std::string("cannot read ") + path + " as a GGUF file");
            return -1;
        }
        const int64_t arch_key = gguf_find_key(g.get(), "general.architecture");
        if (arch_key < 0 || gguf_get_kv_type(g.get(), arch_key) != GGUF_TYPE_STRING ||
            std::strcmp(gguf_get_val_str(g.get(), arch_key), "controlvector") != 0) {
            engine->fail(std::string(path) + " is not a control-vector file (general.architecture != controlvector)");
            return -1;
        }
        std::string alignment = "all";
        const int64_t align_key = gguf_find_key(g.get(), "pyactadd.alignment");
        if (align_key >= 0 && gguf_get_kv_type(g.get(), align_key) == GGUF_TYPE_STRING) {
            alignment = gguf_get_val_str(g.get(), align_key);
        }
        if (alignment != "front" && alignment != "all") {
            engine->fail(std::string(path) + ": alignment '" + alignment +
                         "' needs the prompt length; add its rows with pyactadd_engine_add and an offset");
            return -1;
        }
        // Stage everything first so a bad tensor leaves the engine unchanged.
        pyactadd_engine staged;
        staged.params = engine->params;
        staged.rebuild_index();
        const int64_t n_tensors = gguf_get_n_tensors(g.get());
        for (int64_t i = 0; i < n_tensors; ++i) {
            const char * name = gguf_get_tensor_name(g.get(), i);
            int32_t il = -1;
            if (std::strncmp(name, "direction.", 10) == 0) {
                char * end = nullptr;
                const long v = std::strtol(name + 10, &end, 10);
                il = (end != name + 10 && *end == '\0' && v >= 0 && v < 1000000) ? (int32_t) v : -1;
            }
            ggml_tensor * t = ggml_get_tensor(ctx.get(), name);
            if (il < 0 || t == nullptr) {
                engine->fail(std::string(path) + ": unexpected tensor '" + name + "' (want direction.<il>)");
                return -1;
            }
            if (t->type != GGML_TYPE_F32 || ggml_n_dims(t) > 2) {
                engine->fail(std::string(path) + ": tensor " + name + " must be F32 with 1 or 2 dimensions");
                return -1;
            }
            const int32_t n_rows = (int32_t) t->ne[1];
            const pyactadd_align al = (alignment == "all") ? PYACTADD_ALIGN_ALL : PYACTADD_ALIGN_POSITIONS;
            std::vector<float> rows(static_cast<const float *>(t->data), static_cast<const float *>(t->data) + ggml_nelements(t));
            for (float & v : rows) {
                v *= coeff;
            }
            if (staged.add(il, rows.data(), n_rows, (int32_t) t->ne[0], 0, al) < 0) {
                engine->fail(std::string(path) + ": " + name + ": " + staged.last_error);
                return -1;
            }
        }
        if (staged.tensors.empty()) {
            engine->fail(std::string(path) + " holds no direction tensors");
            return -1;
        }
        for (steering_tensor & s : staged.tensors) {
            s.id = engine->next_id++;
            engine->tensors.push_back(std::move(s));
        }
        engine->rebuild_index();
        return (int32_t) staged.tensors.size();
    } catch (const std::bad_alloc &) {
        engine->fail("out of memory while loading a steering file");
        return -1;
    } catch (...) {
        engine->fail("unexpected error while loading a steering file");
        return -1;
    }
}

int32_t pyactadd_engine_remove(pyactadd_engine * engine, int32_t id) {
    if (engine == nullptr) {
        return -1;
    }
    engine->last_error.clear();
    for (size_t i = 0; i < engine->tensors.size(); ++i) {
        if (engine->tensors[i].id == id) {
            engine->tensors.erase(engine->tensors.begin() + i);
            engine->rebuild_index();
            return 0;
        }
    }
    engine->fail("no steering tensor with id " + std::to_string(id));
    return -1;
}

void pyactadd_engine_clear(pyactadd_engine * engine) {
    if (engine == nullptr) {
        return;
    }
    engine->tensors.clear();
    engine->rebuild_index();
}

int32_t pyactadd_engine_count(const pyactadd_engine * engine) {
    return engine == nullptr ? 0 : (int32_t) engine->tensors.size();
}

void pyactadd_engine_set_force_device_copy(pyactadd_engine * engine, bool force) {
    if (engine != nullptr) {
        engine->params.force_device_copy = force;
    }
}

int32_t pyactadd_engine_attach(pyactadd_engine * engine, llama_context_params * params) {
    if (engine == nullptr || params == nullptr) {
        return -1;
    }
    if (params->cb_eval == pyactadd_engine_eval_callback && params->cb_eval_user_data == engine) {
        engine->fail("engine is already attached to these context params");
        return -1;
    }
    engine->chained_cb = params->cb_eval;
    engine->chained_user_data = params->cb_eval_user_data;
    params->cb_eval = pyactadd_engine_eval_callback;
    params->cb_eval_user_data = engine;
    return 0;
}

bool pyactadd_engine_eval_callback(ggml_tensor * t, bool ask, void * user_data) {
    auto * engine = static_cast<pyactadd_engine *>(user_data);
    if (engine == nullptr || t == nullptr) {
        return ask ? false : true;
    }
    try {
        return engine->on_eval(t, ask);
    } catch (...) {
        engine->stats.n_errors++;
        engine->fail("unexpected error inside the eval callback");
        return ask ? false : true;
    }
}

pyactadd_engine_stats pyactadd_engine_get_stats(const pyactadd_engine * engine) {
    return engine == nullptr ? pyactadd_engine_stats{} : engine->stats;
}

void pyactadd_engine_reset_stats(pyactadd_engine * engine) {
    if (engine != nullptr) {
        engine->stats = {};
    }
}

const char * pyactadd_engine_last_error(const pyactadd_engine * engine) {
    return engine == nullptr ? "no engine" : engine->last_error.c_str();
}

} // extern "C"
