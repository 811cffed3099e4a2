// engine_test.cpp: the C API of pyactadd.h, without a model unless one is given.
//
// Meant to run under AddressSanitizer + UndefinedBehaviorSanitizer (CMake
// -DPYACTADD_SANITIZE=ON -DPYACTADD_BUILD_TESTS=ON; tests/cpp/test_c_api.py builds and runs
// it). It checks every documented return code and that a refused call leaves the engine
// unchanged, loads hand-written GGUF files (valid, missing, garbage, truncated, wrong
// shapes), and drives the eval callback the way ggml_backend_sched does on tiny
// synthetic graphs: an I32 "inp_pos" input, a rope-like node that reads it, and an
// "l_out-<il>" node in a CPU backend buffer. Each graph scenario runs twice, once on the
// host path and once with force_device_copy (the ggml_backend_tensor_get/set path that
// CUDA and Metal buffers take). pyactadd_file_read_info reads hand-written pyactadd and
// stock control-vector files. Given a model (engine_test MODEL.gguf), it also checks an
// engine created from params.model: files whose fingerprint names another model are
// refused with PYACTADD_STATUS_MODEL_MISMATCH.
//
// Exit code: 0 when every check passes, 1 otherwise (each failed check prints a line).

#include "pyactadd.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"
#include "gguf.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include <unistd.h>

namespace fs = std::filesystem;

// engine_test_c.c
extern "C" int32_t engine_test_c_add_raw_align(pyactadd_engine * engine, int32_t il, const float * data, int32_t n_rows,
                                               int32_t n_embd, int32_t offset, int align);
extern "C" int engine_test_c_smoke(void);

namespace {

int g_checks = 0;
int g_failures = 0;

#define CHECK(cond)                                                                           \
    do {                                                                                      \
        ++g_checks;                                                                           \
        if (!(cond)) {                                                                        \
            std::fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);     \
            ++g_failures;                                                                     \
        }                                                                                     \
    } while (0)

constexpr int32_t N_EMBD = 8;
constexpr int32_t N_LAYER = 6; // valid il: 0..4

struct engine_deleter {
    void operator()(pyactadd_engine * e) const { pyactadd_engine_free(e); }
};
using engine_ptr = std::unique_ptr<pyactadd_engine, engine_deleter>;

struct ggml_ctx_deleter {
    void operator()(ggml_context * c) const { ggml_free(c); }
};
struct buffer_deleter {
    void operator()(ggml_backend_buffer_t b) const { ggml_backend_buffer_free(b); }
};

engine_ptr make_engine(bool force_device_copy = false) {
    pyactadd_engine_params p = pyactadd_engine_default_params();
    p.n_embd = N_EMBD;
    p.n_layer = N_LAYER;
    p.force_device_copy = force_device_copy;
    return engine_ptr(pyactadd_engine_create(p));
}

bool contains(const char * haystack, const char * needle) {
    return haystack != nullptr && std::strstr(haystack, needle) != nullptr;
}

// n_rows x N_EMBD distinct values: row r, column k = scale * (100 r + k + 1).
std::vector<float> rows_of(int n_rows, float scale = 1.0f) {
    std::vector<float> v((size_t) n_rows * N_EMBD);
    for (int r = 0; r < n_rows; ++r) {
        for (int k = 0; k < N_EMBD; ++k) {
            v[(size_t) r * N_EMBD + k] = scale * (float) (100 * r + k + 1);
        }
    }
    return v;
}

// --- synthetic graphs ------------------------------------------------------------------

// A micro-batch as the callback sees it: positions input, a node reading it (as rope
// does; that is where the engine learns the positions), and the layer output.
struct graph {
    std::unique_ptr<ggml_context, ggml_ctx_deleter> ctx;
    std::unique_ptr<ggml_backend_buffer, buffer_deleter> buf;
    ggml_tensor * pos = nullptr;
    ggml_tensor * rope = nullptr;
    ggml_tensor * out = nullptr;
    ggml_tensor * tok = nullptr;  // "inp_tokens", when graph_opts.tokens is given
    ggml_tensor * embd = nullptr; // the get_rows-like node reading it
    int64_t n_tokens = 0;
};

struct graph_opts {
    const char * out_name = "l_out-3";
    ggml_type out_type = GGML_TYPE_F32;
    int64_t out_ne0 = N_EMBD;
    const char * pos_name = "inp_pos";
    bool with_rope = true;     // a node with inp_pos as src, evaluated before l_out
    bool out_reads_pos = false; // l_out itself has inp_pos as src[0]
    std::vector<int32_t> tokens = {}; // token ids: an "inp_tokens" input read by a node before l_out
    bool token_path_computed = true; // that node carries GGML_TENSOR_FLAG_COMPUTE (llama.cpp's token path)
};

graph make_graph(const std::vector<int32_t> & positions, const graph_opts & o = graph_opts()) {
    graph g;
    g.n_tokens = (int64_t) positions.size();
    ggml_init_params ip = { /*.mem_size =*/ 8 * ggml_tensor_overhead(), /*.mem_buffer =*/ nullptr, /*.no_alloc =*/ true };
    g.ctx.reset(ggml_init(ip));
    g.pos = ggml_new_tensor_1d(g.ctx.get(), GGML_TYPE_I32, g.n_tokens);
    ggml_set_name(g.pos, o.pos_name);
    if (o.with_rope) {
        g.rope = ggml_new_tensor_2d(g.ctx.get(), GGML_TYPE_F32, N_EMBD, g.n_tokens);
        ggml_set_name(g.rope, "Qcur-0");
        g.rope->src[1] = g.pos; // ggml_rope(ctx, a, b=positions, ...)
    }
    g.out = ggml_new_tensor_2d(g.ctx.get(), o.out_type, o.out_ne0, g.n_tokens);
    ggml_set_name(g.out, o.out_name);
    if (o.out_reads_pos) {
        g.out->src[0] = g.pos;
    }
    if (!o.tokens.empty()) {
        g.tok = ggml_new_tensor_1d(g.ctx.get(), GGML_TYPE_I32, (int64_t) o.tokens.size());
        ggml_set_name(g.tok, "inp_tokens");
        g.embd = ggml_new_tensor_2d(g.ctx.get(), GGML_TYPE_F32, N_EMBD, (int64_t) o.tokens.size());
        ggml_set_name(g.embd, "embd");
        g.embd->src[1] = g.tok; // ggml_get_rows(ctx, tok_embd, tokens)
        g.embd->flags |= o.token_path_computed ? GGML_TENSOR_FLAG_COMPUTE : 0;
    }
    // A CPU backend buffer: host memory that ggml_backend_tensor_get/set also work on.
    g.buf.reset(ggml_backend_alloc_ctx_tensors_from_buft(g.ctx.get(), ggml_backend_cpu_buffer_type()));
    if (g.buf) {
        ggml_backend_buffer_clear(g.buf.get(), 0);
        ggml_backend_tensor_set(g.pos, positions.data(), 0, positions.size() * sizeof(int32_t));
        if (g.tok != nullptr) {
            ggml_backend_tensor_set(g.tok, o.tokens.data(), 0, o.tokens.size() * sizeof(int32_t));
        }
    }
    return g;
}

std::vector<float> read_out(const graph & g) {
    std::vector<float> v(ggml_nelements(g.out));
    if (g.out->type == GGML_TYPE_F32) {
        ggml_backend_tensor_get(g.out, v.data(), 0, v.size() * sizeof(float));
    }
    return v;
}

// Drives one node the way ggml_backend_sched does: ask; if the answer is yes, the node is
// computed and the callback is called again with ask=false. Returns the ask answer;
// *keep_going gets the second answer (true when there was no second call).
bool eval_node(ggml_backend_sched_eval_callback cb, void * ud, ggml_tensor * t, bool * keep_going = nullptr) {
    const bool asked = cb(t, true, ud);
    const bool go = asked ? cb(t, false, ud) : true;
    if (keep_going != nullptr) {
        *keep_going = go;
    }
    return asked;
}

// Evaluates the graph's nodes in order with the engine's callback; returns whether the
// engine asked for l_out (*keep_going: its second answer for l_out).
bool run_graph(pyactadd_engine * e, graph & g, bool * keep_going = nullptr) {
    if (g.embd != nullptr) {
        eval_node(pyactadd_engine_eval_callback, e, g.embd);
    }
    if (g.rope != nullptr) {
        eval_node(pyactadd_engine_eval_callback, e, g.rope);
    }
    return eval_node(pyactadd_engine_eval_callback, e, g.out, keep_going);
}

// Column-wise expectation: expected[col] = sum of the given rows (nullptr: zero column).
std::vector<float> expect_cols(const std::vector<std::vector<const float *>> & cols) {
    std::vector<float> v(cols.size() * N_EMBD, 0.0f);
    for (size_t c = 0; c < cols.size(); ++c) {
        for (const float * row : cols[c]) {
            for (int k = 0; k < N_EMBD; ++k) {
                v[c * N_EMBD + k] += row[k];
            }
        }
    }
    return v;
}

bool same(const std::vector<float> & a, const std::vector<float> & b) {
    if (a.size() != b.size()) {
        return false;
    }
    for (size_t i = 0; i < a.size(); ++i) {
        if (a[i] != b[i]) {
            std::fprintf(stderr, "  element %zu: got %g, want %g\n", i, a[i], b[i]);
            return false;
        }
    }
    return true;
}

// --- GGUF files ------------------------------------------------------------------------

struct file_tensor {
    std::string name;
    ggml_type type = GGML_TYPE_F32;
    std::vector<int64_t> ne; // 1 to 3 dims
    std::vector<float> data; // F32 values (converted for F16)
};

// The metadata a test file gets; the pyactadd.* keys with the GGUF types pyactadd's
// writer (pyactadd/vector/gguf_file.py) gives them.
struct file_meta {
    const char * arch = "controlvector";   // general.architecture, unless null
    const char * alignment = nullptr;      // pyactadd.alignment, unless null
    bool anchor_id_key = true;             // write pyactadd.anchor_token_id = anchor_id
    int32_t anchor_id = -1;
    const char * anchor = nullptr;         // pyactadd.anchor, unless null
    bool fingerprint = false;              // write pyactadd.model.* from the four below
    const char * model_arch = "llama";
    uint32_t n_embd = N_EMBD, n_layer = N_LAYER, n_vocab = 1000;
    const char * float_key = nullptr;      // a key written as FLOAT32 (a wrong type), unless null
};

void set_meta(gguf_context * g, const file_meta & m) {
    if (m.arch != nullptr) {
        gguf_set_val_str(g, "general.architecture", m.arch);
    }
    if (m.alignment != nullptr) {
        gguf_set_val_str(g, "pyactadd.alignment", m.alignment);
    }
    if (m.anchor_id_key) {
        gguf_set_val_i32(g, "pyactadd.anchor_token_id", m.anchor_id);
    }
    if (m.anchor != nullptr) {
        gguf_set_val_str(g, "pyactadd.anchor", m.anchor);
    }
    if (m.fingerprint) {
        gguf_set_val_str(g, "pyactadd.model.architecture", m.model_arch);
        gguf_set_val_u32(g, "pyactadd.model.n_embd", m.n_embd);
        gguf_set_val_u32(g, "pyactadd.model.n_layer", m.n_layer);
        gguf_set_val_u32(g, "pyactadd.model.n_vocab", m.n_vocab);
    }
    if (m.float_key != nullptr) {
        gguf_set_val_f32(g, m.float_key, 1.0f);
    }
}

bool write_gguf(const fs::path & path, const file_meta & meta, const std::vector<file_tensor> & tensors) {
    size_t bytes = 0;
    for (const file_tensor & t : tensors) {
        bytes += t.data.size() * sizeof(float) + 64;
    }
    ggml_init_params ip = { /*.mem_size =*/ bytes + (tensors.size() + 1) * ggml_tensor_overhead(), /*.mem_buffer =*/ nullptr,
                            /*.no_alloc =*/ false };
    std::unique_ptr<ggml_context, ggml_ctx_deleter> ctx(ggml_init(ip));
    gguf_context * g = gguf_init_empty();
    set_meta(g, meta);
    for (const file_tensor & t : tensors) {
        ggml_tensor * x = nullptr;
        if (t.ne.size() == 1) {
            x = ggml_new_tensor_1d(ctx.get(), t.type, t.ne[0]);
        } else if (t.ne.size() == 2) {
            x = ggml_new_tensor_2d(ctx.get(), t.type, t.ne[0], t.ne[1]);
        } else {
            x = ggml_new_tensor_3d(ctx.get(), t.type, t.ne[0], t.ne[1], t.ne[2]);
        }
        ggml_set_name(x, t.name.c_str());
        if (t.type == GGML_TYPE_F32) {
            std::memcpy(x->data, t.data.data(), ggml_nbytes(x));
        } else {
            ggml_fp32_to_fp16_row(t.data.data(), static_cast<ggml_fp16_t *>(x->data), ggml_nelements(x));
        }
        gguf_add_tensor(g, x);
    }
    const bool ok = gguf_write_to_file(g, path.string().c_str(), false);
    gguf_free(g);
    return ok;
}

// Writes a GGUF with general.architecture = arch and, unless null, pyactadd.alignment.
bool write_gguf(const fs::path & path, const char * arch, const char * alignment, const std::vector<file_tensor> & tensors,
                int32_t anchor = -1) {
    file_meta m;
    m.arch = arch;
    m.alignment = alignment;
    m.anchor_id = anchor;
    return write_gguf(path, m, tensors);
}

file_tensor direction(int il, int n_rows, float scale = 1.0f) {
    file_tensor t;
    t.name = "direction." + std::to_string(il);
    t.ne = n_rows == 0 ? std::vector<int64_t>{ N_EMBD } : std::vector<int64_t>{ N_EMBD, n_rows };
    t.data = rows_of(n_rows == 0 ? 1 : n_rows, scale);
    return t;
}

void write_bytes(const fs::path & path, const std::string & bytes) {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f.write(bytes.data(), (std::streamsize) bytes.size());
}

std::string read_bytes(const fs::path & path) {
    std::ifstream f(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

// --- the tests -------------------------------------------------------------------------

void test_create_and_null_handles() {
    const pyactadd_engine_params d = pyactadd_engine_default_params();
    CHECK(d.n_embd == 0 && d.n_layer == 0 && !d.force_device_copy);
    CHECK(pyactadd_engine_create(d) == nullptr);

    pyactadd_engine_params p = d;
    p.n_embd = N_EMBD;
    p.n_layer = 1; // needs at least 2 blocks
    CHECK(pyactadd_engine_create(p) == nullptr);
    p.n_layer = N_LAYER;
    p.n_embd = -4;
    CHECK(pyactadd_engine_create(p) == nullptr);
    p.n_embd = N_EMBD;
    engine_ptr e(pyactadd_engine_create(p));
    CHECK(e != nullptr);
    CHECK(pyactadd_engine_count(e.get()) == 0);
    CHECK(std::strcmp(pyactadd_engine_last_error(e.get()), "") == 0);

    // NULL engines: documented no-ops and error returns, never a crash.
    const std::vector<float> r = rows_of(1);
    pyactadd_engine_free(nullptr);
    CHECK(pyactadd_engine_add(nullptr, 0, r.data(), 1, N_EMBD, 0, PYACTADD_ALIGN_POSITIONS) == -1);
    CHECK(pyactadd_engine_load_file(nullptr, "x.gguf", 1.0f) == -1);
    CHECK(pyactadd_engine_remove(nullptr, 0) == -1);
    pyactadd_engine_clear(nullptr);
    CHECK(pyactadd_engine_count(nullptr) == 0);
    pyactadd_engine_set_force_device_copy(nullptr, true);
    llama_context_params cp = llama_context_default_params();
    CHECK(pyactadd_engine_attach(nullptr, &cp) == -1);
    CHECK(cp.cb_eval == nullptr);
    const pyactadd_engine_stats s = pyactadd_engine_get_stats(nullptr);
    CHECK(s.n_layer_outputs_seen == 0 && s.n_errors == 0);
    pyactadd_engine_reset_stats(nullptr);
    CHECK(contains(pyactadd_engine_last_error(nullptr), "no engine"));
}

void test_add_validation() {
    engine_ptr e = make_engine();
    const std::vector<float> two = rows_of(2);
    struct bad_case {
        const char * what;
        int32_t il;
        const float * data;
        int32_t n_rows, n_embd, offset;
        pyactadd_align align;
        const char * msg;
    };
    std::vector<float> with_nan = two;
    with_nan[5] = std::numeric_limits<float>::quiet_NaN();
    std::vector<float> with_inf = two;
    with_inf[N_EMBD + 1] = -std::numeric_limits<float>::infinity();
    const bad_case cases[] = {
        { "il < 0", -1, two.data(), 2, N_EMBD, 0, PYACTADD_ALIGN_POSITIONS, "out of range" },
        { "il = n_layer - 1", N_LAYER - 1, two.data(), 2, N_EMBD, 0, PYACTADD_ALIGN_POSITIONS, "out of range" },
        { "n_embd differs", 2, two.data(), 2, N_EMBD - 1, 0, PYACTADD_ALIGN_POSITIONS, "n_embd" },
        { "n_rows = 0", 2, two.data(), 0, N_EMBD, 0, PYACTADD_ALIGN_POSITIONS, "row" },
        { "n_rows < 0", 2, two.data(), -3, N_EMBD, 0, PYACTADD_ALIGN_POSITIONS, "row" },
        { "data NULL", 2, nullptr, 2, N_EMBD, 0, PYACTADD_ALIGN_POSITIONS, "row" },
        { "NaN", 2, with_nan.data(), 2, N_EMBD, 0, PYACTADD_ALIGN_POSITIONS, "NaN" },
        { "inf", 2, with_inf.data(), 2, N_EMBD, 0, PYACTADD_ALIGN_POSITIONS, "inf" },
        { "ALL with 2 rows", 2, two.data(), 2, N_EMBD, 0, PYACTADD_ALIGN_ALL, "one row" },
        { "offset < 0", 2, two.data(), 2, N_EMBD, -1, PYACTADD_ALIGN_POSITIONS, "offset" },
    };
    int32_t first = pyactadd_engine_add(e.get(), 4, two.data(), 2, N_EMBD, 0, PYACTADD_ALIGN_POSITIONS);
    CHECK(first == 0);
    for (const bad_case & c : cases) {
        const int32_t id = pyactadd_engine_add(e.get(), c.il, c.data, c.n_rows, c.n_embd, c.offset, c.align);
        if (id != -1 || !contains(pyactadd_engine_last_error(e.get()), c.msg)) {
            std::fprintf(stderr, "  case '%s': id %d, error '%s'\n", c.what, id, pyactadd_engine_last_error(e.get()));
        }
        CHECK(id == -1);
        CHECK(contains(pyactadd_engine_last_error(e.get()), c.msg));
        CHECK(pyactadd_engine_count(e.get()) == 1); // unchanged
    }
    // An alignment outside the enum, as only a C caller can pass it (see engine_test_c.c).
    CHECK(engine_test_c_add_raw_align(e.get(), 2, two.data(), 2, N_EMBD, 0, 7) == -1);
    CHECK(contains(pyactadd_engine_last_error(e.get()), "unknown alignment"));
    CHECK(pyactadd_engine_count(e.get()) == 1);
    // A refused tensor is not half-added: the layer it named stays unsteered.
    graph g = make_graph({ 0, 1, 2 }, { "l_out-2" });
    CHECK(!run_graph(e.get(), g));
    CHECK(same(read_out(g), std::vector<float>(3 * N_EMBD, 0.0f)));

    // The next success clears the error and ids keep counting.
    CHECK(pyactadd_engine_add(e.get(), 0, two.data(), 1, N_EMBD, 3, PYACTADD_ALIGN_POSITIONS) == 1);
    CHECK(std::strcmp(pyactadd_engine_last_error(e.get()), "") == 0);
    CHECK(pyactadd_engine_add(e.get(), 1, two.data(), 1, N_EMBD, 0, PYACTADD_ALIGN_ALL) == 2);
    CHECK(pyactadd_engine_count(e.get()) == 3);
}

void test_remove_and_clear() {
    engine_ptr e = make_engine();
    const std::vector<float> r = rows_of(2);
    const int32_t a = pyactadd_engine_add(e.get(), 3, r.data(), 2, N_EMBD, 0, PYACTADD_ALIGN_POSITIONS);
    const int32_t b = pyactadd_engine_add(e.get(), 3, r.data(), 1, N_EMBD, 0, PYACTADD_ALIGN_ALL);
    CHECK(a == 0 && b == 1);
    CHECK(pyactadd_engine_remove(e.get(), a) == 0);
    CHECK(pyactadd_engine_count(e.get()) == 1);
    CHECK(pyactadd_engine_remove(e.get(), a) == -1);
    CHECK(contains(pyactadd_engine_last_error(e.get()), "no steering tensor"));
    CHECK(pyactadd_engine_remove(e.get(), 99) == -1);
    // A successful call clears the error of the failed one before it.
    const int32_t c = pyactadd_engine_add(e.get(), 3, r.data(), 1, N_EMBD, 0, PYACTADD_ALIGN_ALL);
    CHECK(pyactadd_engine_remove(e.get(), c) == 0);
    CHECK(std::string(pyactadd_engine_last_error(e.get())).empty());

    // The remaining tensor (ALL) still steers; after clear nothing does.
    graph g = make_graph({ 0, 1 });
    CHECK(run_graph(e.get(), g));
    CHECK(same(read_out(g), expect_cols({ { r.data() }, { r.data() } })));
    pyactadd_engine_clear(e.get());
    CHECK(pyactadd_engine_count(e.get()) == 0);
    CHECK(pyactadd_engine_remove(e.get(), b) == -1);
    graph g2 = make_graph({ 0, 1 });
    CHECK(!run_graph(e.get(), g2));
    CHECK(same(read_out(g2), std::vector<float>(2 * N_EMBD, 0.0f)));
    // Ids are never reused, so a stale id cannot remove a newer tensor.
    CHECK(pyactadd_engine_add(e.get(), 3, r.data(), 1, N_EMBD, 0, PYACTADD_ALIGN_POSITIONS) == 3);
}

void test_attach() {
    engine_ptr e = make_engine();
    CHECK(pyactadd_engine_attach(e.get(), nullptr) == -1);
    llama_context_params cp = llama_context_default_params();
    CHECK(pyactadd_engine_attach(e.get(), &cp) == 0);
    CHECK(cp.cb_eval == pyactadd_engine_eval_callback);
    CHECK(cp.cb_eval_user_data == e.get());
    CHECK(pyactadd_engine_attach(e.get(), &cp) == -1);
    CHECK(contains(pyactadd_engine_last_error(e.get()), "already attached"));
    CHECK(cp.cb_eval == pyactadd_engine_eval_callback && cp.cb_eval_user_data == e.get());
}

// A callback the application had installed before the engine: records what it sees,
// asks for "Qcur-0" and, on that node's second call, asks the scheduler to stop.
struct recorder {
    int asks = 0;
    int computed = 0;
    std::vector<std::string> computed_names;
};

bool recording_cb(ggml_tensor * t, bool ask, void * ud) {
    auto * r = static_cast<recorder *>(ud);
    if (ask) {
        r->asks++;
        return std::strcmp(t->name, "Qcur-0") == 0;
    }
    r->computed++;
    r->computed_names.push_back(t->name);
    return false; // "stop the graph": the engine must pass this answer on
}

void test_chained_callback() {
    engine_ptr e = make_engine();
    const std::vector<float> r = rows_of(1);
    CHECK(pyactadd_engine_add(e.get(), 3, r.data(), 1, N_EMBD, 0, PYACTADD_ALIGN_POSITIONS) == 0);
    recorder rec;
    llama_context_params cp = llama_context_default_params();
    cp.cb_eval = recording_cb;
    cp.cb_eval_user_data = &rec;
    CHECK(pyactadd_engine_attach(e.get(), &cp) == 0);

    graph g = make_graph({ 0, 1 });
    bool go = true;
    CHECK(eval_node(cp.cb_eval, cp.cb_eval_user_data, g.rope, &go)); // the chained callback wants it
    CHECK(!go);                                                        // and its "stop" is honoured
    CHECK(eval_node(cp.cb_eval, cp.cb_eval_user_data, g.out, &go));  // the engine wants l_out
    CHECK(go);                                                         // the chained one did not ask: not called
    CHECK(rec.asks == 2);
    CHECK(rec.computed == 1 && rec.computed_names[0] == "Qcur-0");
    CHECK(same(read_out(g), expect_cols({ { r.data() }, {} })));
}

void test_callback_degenerate_input() {
    graph g = make_graph({ 0 });
    CHECK(!pyactadd_engine_eval_callback(g.out, true, nullptr));
    CHECK(pyactadd_engine_eval_callback(g.out, false, nullptr));
    engine_ptr e = make_engine();
    CHECK(!pyactadd_engine_eval_callback(nullptr, true, e.get()));
    CHECK(pyactadd_engine_eval_callback(nullptr, false, e.get()));

    // Names that only look like layer outputs are not touched.
    const std::vector<float> r = rows_of(1);
    CHECK(pyactadd_engine_add(e.get(), 3, r.data(), 1, N_EMBD, 0, PYACTADD_ALIGN_ALL) == 0);
    for (const char * name : { "l_out-", "l_out-3x", "l_out--3", "xl_out-3", "l_out-99999999999" }) {
        graph h = make_graph({ 0, 1 }, { name });
        CHECK(!run_graph(e.get(), h));
        CHECK(same(read_out(h), std::vector<float>(2 * N_EMBD, 0.0f)));
    }
    CHECK(pyactadd_engine_get_stats(e.get()).n_errors == 0);
}

// --- graph scenarios: each runs on the host path and on the device-copy path (force) ---

// Two position rows and an all-positions row, as the scenarios use them.
struct scenario_rows {
    std::vector<float> R = rows_of(2);
    std::vector<float> A = rows_of(1, -0.5f);
    const float * r0 = R.data();
    const float * r1 = R.data() + N_EMBD;
};

// An engine with the two position rows at l_out-3, from position 0.
engine_ptr steered_engine(bool force, const scenario_rows & rows) {
    engine_ptr e = make_engine(force);
    CHECK(pyactadd_engine_add(e.get(), 3, rows.R.data(), 2, N_EMBD, 0, PYACTADD_ALIGN_POSITIONS) == 0);
    return e;
}

// Front: rows 0 and 1 at positions 0 and 1.
void scenario_front(bool force) {
    const scenario_rows rows;
    engine_ptr e = steered_engine(force, rows);
    graph g = make_graph({ 0, 1, 2, 3 });
    CHECK(run_graph(e.get(), g));
    CHECK(same(read_out(g), expect_cols({ { rows.r0 }, { rows.r1 }, {}, {} })));
    const pyactadd_engine_stats s = pyactadd_engine_get_stats(e.get());
    CHECK(s.n_layer_outputs_seen == 1 && s.n_layer_outputs_steered == 1 && s.n_rows_added == 2 && s.n_errors == 0);
    // positions read once, the span read once and written once
    CHECK(s.n_device_copies == (force ? 3u : 0u));

    // A later micro-batch past the steered span: nothing asked, nothing written.
    pyactadd_engine_reset_stats(e.get());
    graph later = make_graph({ 4, 5 });
    CHECK(!run_graph(e.get(), later));
    CHECK(same(read_out(later), std::vector<float>(2 * N_EMBD, 0.0f)));
    const pyactadd_engine_stats s2 = pyactadd_engine_get_stats(e.get());
    CHECK(s2.n_layer_outputs_seen == 1 && s2.n_layer_outputs_steered == 0 && s2.n_rows_added == 0);

    // Single-token decoding: each micro-batch picks the row of its own position.
    for (int32_t p = 0; p < 3; ++p) {
        graph one = make_graph({ p });
        CHECK(run_graph(e.get(), one) == (p < 2));
        CHECK(same(read_out(one), p < 2 ? expect_cols({ { rows.R.data() + p * N_EMBD } }) : std::vector<float>(N_EMBD, 0.0f)));
    }
    // Other layers are not touched.
    graph other = make_graph({ 0, 1 }, { "l_out-2" });
    CHECK(!run_graph(e.get(), other));
    CHECK(same(read_out(other), std::vector<float>(2 * N_EMBD, 0.0f)));
}

// Offset 5: rows at positions 5 and 6, in a micro-batch holding positions 4..7.
void scenario_offset(bool force) {
    const scenario_rows rows;
    engine_ptr e = make_engine(force);
    CHECK(pyactadd_engine_add(e.get(), 3, rows.R.data(), 2, N_EMBD, 5, PYACTADD_ALIGN_POSITIONS) == 0);
    graph g = make_graph({ 4, 5, 6, 7 });
    CHECK(run_graph(e.get(), g));
    CHECK(same(read_out(g), expect_cols({ {}, { rows.r0 }, { rows.r1 }, {} })));
    // A micro-batch boundary inside the span: 0..5 gets row 0 only, 6.. gets row 1.
    graph first = make_graph({ 2, 3, 4, 5 });
    graph second = make_graph({ 6, 7 });
    CHECK(run_graph(e.get(), first));
    CHECK(run_graph(e.get(), second));
    CHECK(same(read_out(first), expect_cols({ {}, {}, {}, { rows.r0 } })));
    CHECK(same(read_out(second), expect_cols({ { rows.r1 }, {} })));
    CHECK(pyactadd_engine_get_stats(e.get()).n_rows_added == 4);
}

// All positions, plus a front tensor on the same layer: the rows add up.
void scenario_all_plus_front(bool force) {
    const scenario_rows rows;
    engine_ptr e = make_engine(force);
    CHECK(pyactadd_engine_add(e.get(), 3, rows.A.data(), 1, N_EMBD, 0, PYACTADD_ALIGN_ALL) == 0);
    CHECK(pyactadd_engine_add(e.get(), 3, rows.R.data(), 2, N_EMBD, 0, PYACTADD_ALIGN_POSITIONS) == 1);
    graph g = make_graph({ 0, 1, 2 });
    CHECK(run_graph(e.get(), g));
    CHECK(same(read_out(g), expect_cols({ { rows.A.data(), rows.r0 }, { rows.A.data(), rows.r1 }, { rows.A.data() } })));
    CHECK(pyactadd_engine_get_stats(e.get()).n_rows_added == 3);
    graph late = make_graph({ 1000 });
    CHECK(run_graph(e.get(), late));
    CHECK(same(read_out(late), expect_cols({ { rows.A.data() } })));
}

// Two sequences in one micro-batch (positions 0,1 and 0,1): rows match by position only.
void scenario_two_sequences(bool force) {
    const scenario_rows rows;
    engine_ptr e = steered_engine(force, rows);
    graph g = make_graph({ 0, 1, 0, 1, 2 });
    CHECK(run_graph(e.get(), g));
    CHECK(same(read_out(g), expect_cols({ { rows.r0 }, { rows.r1 }, { rows.r0 }, { rows.r1 }, {} })));
    CHECK(pyactadd_engine_get_stats(e.get()).n_rows_added == 4);
}

// Positions found on l_out itself, and under the scheduler's copy name.
void scenario_positions_found_elsewhere(bool force) {
    const scenario_rows rows;
    engine_ptr e = steered_engine(force, rows);
    graph_opts o;
    o.with_rope = false;
    o.out_reads_pos = true;
    o.pos_name = "CPU#inp_pos#0";
    graph g = make_graph({ 1, 2 }, o);
    CHECK(run_graph(e.get(), g));
    CHECK(same(read_out(g), expect_cols({ { rows.r1 }, {} })));
}

// A graph for positions 0 and 1 built with o, run through an engine that must not ask for its l_out.
graph unasked_graph(pyactadd_engine * e, const graph_opts & o) {
    graph g = make_graph({ 0, 1 }, o);
    CHECK(!run_graph(e, g));
    return g;
}

// Wrong-typed or wrong-shaped l_out: skipped, counted, reported, not written.
void scenario_bad_layer_output(bool force) {
    const scenario_rows rows;
    engine_ptr e = steered_engine(force, rows);
    graph_opts f16;
    f16.out_type = GGML_TYPE_F16;
    graph g = unasked_graph(e.get(), f16);
    pyactadd_engine_stats s = pyactadd_engine_get_stats(e.get());
    CHECK(s.n_errors == 1 && s.n_layer_outputs_steered == 0 && s.n_rows_added == 0);
    CHECK(contains(pyactadd_engine_last_error(e.get()), "l_out-3"));
    std::vector<uint16_t> raw(2 * N_EMBD, 0xffff);
    ggml_backend_tensor_get(g.out, raw.data(), 0, raw.size() * sizeof(uint16_t));
    CHECK(raw == std::vector<uint16_t>(2 * N_EMBD, 0));

    graph_opts wide;
    wide.out_ne0 = N_EMBD + 1;
    graph w = unasked_graph(e.get(), wide);
    CHECK(pyactadd_engine_get_stats(e.get()).n_errors == 2);
    CHECK(same(read_out(w), std::vector<float>(2 * (N_EMBD + 1), 0.0f)));

    // The engine keeps working after a skipped tensor.
    graph ok = make_graph({ 0, 1 });
    CHECK(run_graph(e.get(), ok));
    CHECK(same(read_out(ok), expect_cols({ { rows.r0 }, { rows.r1 } })));
}

// A graph without positions input: reported, nothing written.
void scenario_no_positions_input(bool force) {
    const scenario_rows rows;
    engine_ptr e = steered_engine(force, rows);
    graph_opts o;
    o.with_rope = false;
    graph g = unasked_graph(e.get(), o);
    CHECK(pyactadd_engine_get_stats(e.get()).n_errors == 1);
    CHECK(contains(pyactadd_engine_last_error(e.get()), "inp_pos"));
    CHECK(same(read_out(g), std::vector<float>(2 * N_EMBD, 0.0f)));
}

// Switching paths on a live engine.
void scenario_switching_paths(bool force) {
    const scenario_rows rows;
    engine_ptr e = make_engine(!force);
    pyactadd_engine_set_force_device_copy(e.get(), force);
    CHECK(pyactadd_engine_add(e.get(), 3, rows.R.data(), 2, N_EMBD, 0, PYACTADD_ALIGN_POSITIONS) == 0);
    graph g = make_graph({ 0, 1 });
    CHECK(run_graph(e.get(), g));
    CHECK(same(read_out(g), expect_cols({ { rows.r0 }, { rows.r1 } })));
    CHECK((pyactadd_engine_get_stats(e.get()).n_device_copies > 0) == force);
}

// The graph scenarios, on the host path and on the device-copy path.

// --- capture mode ----------------------------------------------------------------------

// Writes "computed" values into a graph's l_out: column i, element k = base + 100 i + k.
std::vector<float> fill_out(graph & g, float base) {
    std::vector<float> v((size_t) g.n_tokens * N_EMBD);
    for (int64_t i = 0; i < g.n_tokens; ++i) {
        for (int k = 0; k < N_EMBD; ++k) {
            v[(size_t) i * N_EMBD + k] = base + (float) (100 * i + k);
        }
    }
    ggml_backend_tensor_set(g.out, v.data(), 0, v.size() * sizeof(float));
    return v;
}

// The rows and positions captured at il.
std::vector<float> captured_rows(const pyactadd_engine * e, int32_t il, std::vector<int32_t> * positions = nullptr) {
    const int32_t n = pyactadd_engine_capture_n_rows(e, il);
    std::vector<float> rows((size_t) std::max(n, 0) * N_EMBD);
    std::vector<int32_t> pos((size_t) std::max(n, 0));
    CHECK(n >= 0 && pyactadd_engine_capture_read(e, il, rows.data(), pos.data(), n) == n);
    if (positions != nullptr) {
        *positions = pos;
    }
    return rows;
}

// Every documented refusal, and a refused call leaves the capture as it was.
void test_capture_validation() {
    engine_ptr e = make_engine();
    const int32_t ok[] = { 3, 1, 3 };
    const int32_t bad[] = { 1, N_LAYER - 1 };
    CHECK(pyactadd_engine_capture(nullptr, ok, 2, false) == PYACTADD_STATUS_ERROR);
    CHECK(pyactadd_engine_capture(e.get(), nullptr, 2, false) == PYACTADD_STATUS_ERROR);
    CHECK(pyactadd_engine_capture(e.get(), ok, -1, false) == PYACTADD_STATUS_ERROR);
    CHECK(pyactadd_engine_capture(e.get(), bad, 2, false) == PYACTADD_STATUS_ERROR);
    CHECK(contains(pyactadd_engine_last_error(e.get()), "out of range"));
    CHECK(pyactadd_engine_capture_n_rows(e.get(), 1) == -1); // still off
    CHECK(pyactadd_engine_capture(e.get(), ok, 3, false) == 0);
    CHECK(std::strcmp(pyactadd_engine_last_error(e.get()), "") == 0);
    CHECK(pyactadd_engine_capture(e.get(), bad, 2, false) == PYACTADD_STATUS_ERROR);
    CHECK(pyactadd_engine_capture_n_rows(e.get(), 1) == 0 && pyactadd_engine_capture_n_rows(e.get(), 3) == 0);
    CHECK(pyactadd_engine_capture_n_rows(e.get(), 2) == -1);
    float row[N_EMBD];
    int32_t pos[1];
    CHECK(pyactadd_engine_capture_read(e.get(), 2, row, pos, 1) == -1);
    CHECK(pyactadd_engine_capture_read(e.get(), 1, nullptr, pos, 1) == -1);
    CHECK(pyactadd_engine_capture_read(e.get(), 1, row, pos, -1) == -1);
    CHECK(pyactadd_engine_capture_read(e.get(), 1, row, nullptr, 1) == 0);
    CHECK(pyactadd_engine_capture_read(nullptr, 1, row, pos, 1) == -1);
    CHECK(pyactadd_engine_capture_n_rows(nullptr, 1) == -1);
    pyactadd_engine_capture_clear(nullptr);
    CHECK(!pyactadd_engine_abort_callback(nullptr));
    CHECK(!pyactadd_engine_abort_callback(e.get()));
    CHECK(pyactadd_engine_capture(e.get(), nullptr, 0, true) == 0); // off again
    CHECK(pyactadd_engine_capture_n_rows(e.get(), 1) == -1);
    graph g = make_graph({ 0, 1 }, { "l_out-1" });
    CHECK(!run_graph(e.get(), g));
}

// Rows of two layers, in order, with positions; micro-batches append; steering is included; clear forgets.
void scenario_capture(bool force) {
    engine_ptr e = make_engine(force);
    const int32_t layers[] = { 1, 3 };
    CHECK(pyactadd_engine_capture(e.get(), layers, 2, false) == 0);
    const std::vector<float> steer = rows_of(1);
    CHECK(pyactadd_engine_add(e.get(), 3, steer.data(), 1, N_EMBD, 0, PYACTADD_ALIGN_ALL) == 0);
    graph g1 = make_graph({ 0, 1, 2 }, { "l_out-1" });
    graph g2 = make_graph({ 0, 1, 2 }, { "l_out-2" });
    graph g3 = make_graph({ 0, 1, 2 });
    const std::vector<float> v1 = fill_out(g1, 0.5f);
    fill_out(g2, 1.0f);
    const std::vector<float> v3 = fill_out(g3, 7.0f);
    CHECK(run_graph(e.get(), g1));
    CHECK(!run_graph(e.get(), g2));
    CHECK(run_graph(e.get(), g3));
    std::vector<int32_t> pos;
    CHECK(same(captured_rows(e.get(), 1, &pos), v1));
    CHECK(pos == std::vector<int32_t>({ 0, 1, 2 }));
    CHECK(same(read_out(g1), v1)); // capture only reads
    const std::vector<float> steered = read_out(g3); // the captured rows are the steered ones
    CHECK(same(captured_rows(e.get(), 3), steered));
    CHECK(steered[0] == v3[0] + steer[0]);
    graph later = make_graph({ 3, 4 }, { "l_out-1" });
    const std::vector<float> v1b = fill_out(later, -2.0f);
    CHECK(run_graph(e.get(), later));
    std::vector<float> both = v1;
    both.insert(both.end(), v1b.begin(), v1b.end());
    CHECK(same(captured_rows(e.get(), 1, &pos), both));
    CHECK(pos == std::vector<int32_t>({ 0, 1, 2, 3, 4 }));
    const pyactadd_engine_stats s = pyactadd_engine_get_stats(e.get());
    CHECK(s.n_rows_captured == 8 && s.n_graph_stops == 0 && s.n_errors == 0);
    CHECK((s.n_device_copies > 0) == force);
    pyactadd_engine_capture_clear(e.get());
    CHECK(pyactadd_engine_capture_n_rows(e.get(), 1) == 0 && pyactadd_engine_capture_n_rows(e.get(), 3) == 0);
    // A wrong-typed layer output is not captured, and says so.
    graph_opts f16;
    f16.out_name = "l_out-1";
    f16.out_type = GGML_TYPE_F16;
    graph h = make_graph({ 0, 1 }, f16);
    CHECK(!run_graph(e.get(), h));
    CHECK(pyactadd_engine_capture_n_rows(e.get(), 1) == 0 && contains(pyactadd_engine_last_error(e.get()), "not captured"));
}

bool counting_abort(void * data) {
    int * n = static_cast<int *>(data);
    ++*n;
    return *n > 100;
}

// Early stop: past the deepest layer every node is asked for and refused, the abort callback
// says stop (and chains the application's), and capture_clear re-arms it.
void scenario_capture_stop(bool force) {
    engine_ptr e = make_engine(force);
    const int32_t layers[] = { 3, 1 };
    CHECK(pyactadd_engine_capture(e.get(), layers, 2, true) == 0);
    int n_abort_asks = 0;
    llama_context_params cp = llama_context_default_params();
    cp.abort_callback = counting_abort;
    cp.abort_callback_data = &n_abort_asks;
    CHECK(pyactadd_engine_attach(e.get(), &cp) == 0);
    CHECK(cp.abort_callback == pyactadd_engine_abort_callback && cp.abort_callback_data == e.get());
    for (int round = 0; round < 2; ++round) {
        graph g1 = make_graph({ 0, 1 }, { "l_out-1" });
        graph g3 = make_graph({ 0, 1 });
        graph g4 = make_graph({ 0, 1 }, { "l_out-4" });
        bool go = false;
        CHECK(!eval_node(cp.cb_eval, cp.cb_eval_user_data, g1.rope, &go) && go); // a graph's positions come first
        CHECK(eval_node(cp.cb_eval, cp.cb_eval_user_data, g1.out, &go) && go);
        CHECK(!cp.abort_callback(cp.abort_callback_data));
        CHECK(!eval_node(cp.cb_eval, cp.cb_eval_user_data, g3.rope, &go) && go);
        CHECK(eval_node(cp.cb_eval, cp.cb_eval_user_data, g3.out, &go) && go); // the deepest itself is kept
        CHECK(cp.abort_callback(cp.abort_callback_data));
        CHECK(eval_node(cp.cb_eval, cp.cb_eval_user_data, g4.rope, &go) && !go); // then everything stops
        CHECK(eval_node(cp.cb_eval, cp.cb_eval_user_data, g4.out, &go) && !go);
        CHECK(pyactadd_engine_capture_n_rows(e.get(), 1) == 2 && pyactadd_engine_capture_n_rows(e.get(), 3) == 2);
        CHECK(pyactadd_engine_get_stats(e.get()).n_graph_stops == (uint64_t) round + 1);
        pyactadd_engine_capture_clear(e.get());
        CHECK(!cp.abort_callback(cp.abort_callback_data));
    }
    CHECK(n_abort_asks == 4); // the chained callback is asked whenever the engine is not stopping
    n_abort_asks = 100;       // and its own "abort" passes through
    CHECK(cp.abort_callback(cp.abort_callback_data));
}

// --- sequence-bound steering and declared batches ---------------------------------------

// One token of a declared batch: its id, position and sequences.
struct batch_token {
    int32_t token;
    int32_t pos;
    std::vector<int32_t> seqs;
};

// A llama_batch (llama_batch_init's layout) holding tokens; freed with the holder.
struct declared_batch {
    llama_batch b;
    explicit declared_batch(const std::vector<batch_token> & tokens) : b(llama_batch_init((int32_t) tokens.size(), 0, 4)) {
        for (size_t i = 0; i < tokens.size(); ++i) {
            b.token[i] = tokens[i].token;
            b.pos[i] = tokens[i].pos;
            b.n_seq_id[i] = (int32_t) tokens[i].seqs.size();
            for (size_t k = 0; k < tokens[i].seqs.size(); ++k) {
                b.seq_id[i][k] = tokens[i].seqs[k];
            }
        }
        b.n_tokens = (int32_t) tokens.size();
    }
    ~declared_batch() { llama_batch_free(b); }
    declared_batch(const declared_batch &) = delete;
    declared_batch & operator=(const declared_batch &) = delete;
};

// Two sequences of two tokens each (ids 10, 11 and 20, 21), both from position 0.
const std::vector<batch_token> TWO_SEQS = { { 10, 0, { 0 } }, { 11, 1, { 0 } }, { 20, 0, { 1 } }, { 21, 1, { 1 } } };

graph_opts with_tokens(std::vector<int32_t> tokens) {
    graph_opts o;
    o.tokens = std::move(tokens);
    return o;
}

void test_set_sequences_validation() {
    engine_ptr e = make_engine();
    const std::vector<float> r = rows_of(2);
    CHECK(pyactadd_engine_add(e.get(), 3, r.data(), 2, N_EMBD, 0, PYACTADD_ALIGN_POSITIONS) == 0);
    const int32_t seqs[] = { 1, -1 };
    CHECK(pyactadd_engine_set_sequences(nullptr, 0, seqs, 1) == -1);
    CHECK(pyactadd_engine_set_sequences(e.get(), 7, seqs, 1) == -1);
    CHECK(contains(pyactadd_engine_last_error(e.get()), "no steering tensor with id 7"));
    CHECK(pyactadd_engine_set_sequences(e.get(), 0, seqs, -1) == -1);
    CHECK(pyactadd_engine_set_sequences(e.get(), 0, nullptr, 1) == -1);
    CHECK(pyactadd_engine_set_sequences(e.get(), 0, seqs, 2) == -1);
    CHECK(contains(pyactadd_engine_last_error(e.get()), "negative"));
    // Refused calls left it unbound: steered by position, without a declaration, status 0.
    graph g = make_graph({ 0, 1 });
    CHECK(run_graph(e.get(), g));
    CHECK(same(read_out(g), expect_cols({ { r.data() }, { r.data() + N_EMBD } })));
    CHECK(pyactadd_engine_batch_status(e.get()) == 0);
    CHECK(pyactadd_engine_set_sequences(e.get(), 0, seqs, 1) == 0);
    CHECK(std::strcmp(pyactadd_engine_last_error(e.get()), "") == 0);
    CHECK(pyactadd_engine_set_sequences(e.get(), 0, nullptr, 0) == 0); // unbound again
    CHECK(pyactadd_engine_batch_status(nullptr) == PYACTADD_STATUS_ERROR);
}

// declare_batch must refuse b with msg in the error, leaving no declaration and status 0.
void check_declare_refused(pyactadd_engine * e, const llama_batch & b, const char * msg) {
    const int32_t rc = pyactadd_engine_declare_batch(e, &b);
    if (rc != -1 || !contains(pyactadd_engine_last_error(e), msg)) {
        std::fprintf(stderr, "  declare: returned %d, error '%s' (wanted -1, '%s')\n", rc, pyactadd_engine_last_error(e), msg);
    }
    CHECK(rc == -1);
    CHECK(pyactadd_engine_batch_status(e) == 0);
}

void test_declare_validation() {
    engine_ptr e = make_engine();
    const std::vector<float> r = rows_of(1);
    CHECK(pyactadd_engine_add(e.get(), 3, r.data(), 1, N_EMBD, 0, PYACTADD_ALIGN_ALL) == 0);
    const int32_t one[] = { 1 };
    CHECK(pyactadd_engine_set_sequences(e.get(), 0, one, 1) == 0);
    declared_batch good(TWO_SEQS);
    CHECK(pyactadd_engine_declare_batch(nullptr, &good.b) == -1);
    CHECK(pyactadd_engine_declare_batch(e.get(), nullptr) == 0);
    llama_batch b = good.b;
    b.n_tokens = 0;
    check_declare_refused(e.get(), b, "n_tokens >= 1");
    b = good.b;
    b.pos = nullptr;
    check_declare_refused(e.get(), b, "pos");
    b = good.b;
    b.seq_id = nullptr;
    check_declare_refused(e.get(), b, "seq_id");
    declared_batch no_seq({ { 1, 0, {} } });
    check_declare_refused(e.get(), no_seq.b, "no sequence id");
    declared_batch negative({ { 1, 0, { -2 } } });
    check_declare_refused(e.get(), negative.b, "negative");
    declared_batch shared({ { 1, 0, { 0, 1 } }, { 2, 1, { 1 } } }); // token 0 is seq 0's and seq 1's
    check_declare_refused(e.get(), shared.b, "token 0 belongs to sequences {0, 1} but tensor 0 is bound to {1}");
    // A refused declaration leaves none: the bound tensor is not applied, and says why.
    graph g = make_graph({ 0, 1 });
    CHECK(!run_graph(e.get(), g));
    CHECK(same(read_out(g), std::vector<float>(2 * N_EMBD, 0.0f)));
    CHECK(pyactadd_engine_batch_status(e.get()) == PYACTADD_STATUS_BATCH_MISMATCH);
    CHECK(contains(pyactadd_engine_last_error(e.get()), "no batch declared"));
    // Bound to both sequences, the shared token is fine.
    const int32_t both[] = { 1, 0 };
    CHECK(pyactadd_engine_set_sequences(e.get(), 0, both, 2) == 0);
    CHECK(pyactadd_engine_declare_batch(e.get(), &shared.b) == 0);
    CHECK(pyactadd_engine_batch_status(e.get()) == 0);
    // An engine attached to a non-unified context cannot declare.
    llama_context_params cp = llama_context_default_params();
    cp.kv_unified = false;
    CHECK(pyactadd_engine_attach(e.get(), &cp) == 0);
    check_declare_refused(e.get(), good.b, "kv_unified");
}

// A tensor bound to seq 1 (rows R at positions 0, 1) and an unbound all-positions row A.
engine_ptr sequence_engine(bool force, const scenario_rows & rows) {
    engine_ptr e = make_engine(force);
    CHECK(pyactadd_engine_add(e.get(), 3, rows.R.data(), 2, N_EMBD, 0, PYACTADD_ALIGN_POSITIONS) == 0);
    CHECK(pyactadd_engine_add(e.get(), 3, rows.A.data(), 1, N_EMBD, 0, PYACTADD_ALIGN_ALL) == 1);
    const int32_t one[] = { 1 };
    CHECK(pyactadd_engine_set_sequences(e.get(), 0, one, 1) == 0);
    return e;
}

// One micro-batch of two sequences at the same positions: only seq 1's tokens get R.
void scenario_bound_sequences(bool force) {
    const scenario_rows rows;
    engine_ptr e = sequence_engine(force, rows);
    declared_batch b(TWO_SEQS);
    CHECK(pyactadd_engine_declare_batch(e.get(), &b.b) == 0);
    graph g = make_graph({ 0, 1, 0, 1 }, with_tokens({ 10, 11, 20, 21 }));
    CHECK(run_graph(e.get(), g));
    const float * a = rows.A.data();
    CHECK(same(read_out(g), expect_cols({ { a }, { a }, { rows.r0, a }, { rows.r1, a } })));
    const pyactadd_engine_stats s = pyactadd_engine_get_stats(e.get());
    CHECK(s.n_rows_added == 4 && s.n_batch_mismatches == 0 && s.n_errors == 0);
    CHECK(s.n_device_copies == (force ? 3u : 0u)); // positions once, the span read and written once
    CHECK(pyactadd_engine_batch_status(e.get()) == 0);
    // Bound to both, the ALIGN_ALL row too: the same row at every position of their tokens.
    const int32_t both[] = { 0, 1 };
    CHECK(pyactadd_engine_set_sequences(e.get(), 1, both, 2) == 0);
    CHECK(pyactadd_engine_set_sequences(e.get(), 0, both + 1, 1) == 0);
    CHECK(pyactadd_engine_declare_batch(e.get(), &b.b) == 0);
    graph h = make_graph({ 0, 1, 0, 1 });
    CHECK(run_graph(e.get(), h));
    CHECK(same(read_out(h), expect_cols({ { a }, { a }, { rows.r0, a }, { rows.r1, a } })));
}

// llama.cpp's micro-batches (n_ubatch 3 here): consecutive slices, each checked and steered
// by its own declared tokens; positions read once per micro-batch, steered or not.
void scenario_split_batch(bool force) {
    const scenario_rows rows;
    engine_ptr e = sequence_engine(force, rows);
    CHECK(pyactadd_engine_remove(e.get(), 1) == 0); // only the bound tensor
    declared_batch b(TWO_SEQS);
    CHECK(pyactadd_engine_declare_batch(e.get(), &b.b) == 0);
    graph first = make_graph({ 0, 1, 0 }, with_tokens({ 10, 11, 20 }));
    graph second = make_graph({ 1 }, with_tokens({ 21 }));
    CHECK(run_graph(e.get(), first));
    CHECK(run_graph(e.get(), second));
    CHECK(same(read_out(first), expect_cols({ {}, {}, { rows.r0 } })));
    CHECK(same(read_out(second), expect_cols({ { rows.r1 } })));
    CHECK(pyactadd_engine_batch_status(e.get()) == 0);
    CHECK(pyactadd_engine_get_stats(e.get()).n_rows_added == 2);

    // Bound to seq 0 now, micro-batches of 2. Positions are read once per micro-batch: in the
    // first, two layer outputs (l_out-2, then the steered l_out-3) share one read; the
    // second (seq 1's tokens, no steered row) is read all the same, for the check.
    const int32_t zero[] = { 0 };
    CHECK(pyactadd_engine_set_sequences(e.get(), 0, zero, 1) == 0);
    CHECK(pyactadd_engine_declare_batch(e.get(), &b.b) == 0);
    pyactadd_engine_reset_stats(e.get());
    graph s1_l2 = make_graph({ 0, 1 }, { "l_out-2" });
    graph s1_l3 = make_graph({ 0, 1 }); // same micro-batch, deeper layer
    graph s2 = make_graph({ 0, 1 }, { "l_out-2" });
    CHECK(!run_graph(e.get(), s1_l2) && run_graph(e.get(), s1_l3));
    CHECK(same(read_out(s1_l3), expect_cols({ { rows.r0 }, { rows.r1 } })));
    CHECK(pyactadd_engine_get_stats(e.get()).n_device_copies == (force ? 3u : 0u));
    CHECK(!run_graph(e.get(), s2));
    CHECK(pyactadd_engine_get_stats(e.get()).n_device_copies == (force ? 4u : 0u));
    CHECK(pyactadd_engine_batch_status(e.get()) == 0);
    // A second micro-batch that is not the declared batch's next tokens.
    CHECK(pyactadd_engine_declare_batch(e.get(), &b.b) == 0);
    graph ok = make_graph({ 0, 1 }, { "l_out-2" });
    graph bad = make_graph({ 5, 5 }, { "l_out-2" });
    CHECK(!run_graph(e.get(), ok));
    CHECK(run_graph(e.get(), bad)); // asked, so as to refuse it
    CHECK(pyactadd_engine_batch_status(e.get()) == PYACTADD_STATUS_BATCH_MISMATCH);
    CHECK(contains(pyactadd_engine_last_error(e.get()),
                   "micro-batch 1 (from declared token 2): token 0 has position 5, the declared batch has 0 there"));
}

// Another batch than declared: nothing steered, the graph refused and aborted once, status -3.
void scenario_batch_mismatch(bool force) {
    const scenario_rows rows;
    engine_ptr e = sequence_engine(force, rows);
    llama_context_params cp = llama_context_default_params();
    cp.kv_unified = true;
    CHECK(pyactadd_engine_attach(e.get(), &cp) == 0);
    declared_batch b(TWO_SEQS);
    struct wrong_batch {
        std::vector<int32_t> positions, tokens;
        const char * error;
    };
    const wrong_batch wrong[] = {
        { { 0, 1, 0, 2 }, {}, "token 3 has position 2, the declared batch has 1 there" },
        { { 0, 1, 0, 1 }, { 10, 11, 20, 22 }, "token 3 (position 1) is token id 22, the declared batch has 21 there" },
        { { 0, 1, 0, 1, 2 }, {}, "5 tokens, the declared batch has 4 left" },
    };
    uint64_t n = 0;
    for (const wrong_batch & w : wrong) {
        graph g = make_graph(w.positions, with_tokens(w.tokens));
        CHECK(pyactadd_engine_declare_batch(e.get(), &b.b) == 0);
        CHECK(!cp.abort_callback(cp.abort_callback_data));
        bool go = true;
        for (ggml_tensor * before : { g.embd, g.rope }) {
            CHECK(before == nullptr || (!eval_node(cp.cb_eval, cp.cb_eval_user_data, before, &go) && go));
        }
        CHECK(eval_node(cp.cb_eval, cp.cb_eval_user_data, g.out, &go) && !go); // asked, then refused
        CHECK(cp.abort_callback(cp.abort_callback_data));                      // the CPU backend aborts
        CHECK(!cp.abort_callback(cp.abort_callback_data));                     // once: the graph is over
        CHECK(same(read_out(g), std::vector<float>(g.n_tokens * N_EMBD, 0.0f)));
        CHECK(pyactadd_engine_batch_status(e.get()) == PYACTADD_STATUS_BATCH_MISMATCH);
        if (!contains(pyactadd_engine_last_error(e.get()), w.error)) {
            std::fprintf(stderr, "  error '%s', wanted '%s'\n", pyactadd_engine_last_error(e.get()), w.error);
            CHECK(false);
        }
        CHECK(pyactadd_engine_get_stats(e.get()).n_batch_mismatches == ++n);
    }
    CHECK(pyactadd_engine_get_stats(e.get()).n_rows_added == 0);
    // The declaration is gone: the next graph runs, unbound rows only, still a mismatch.
    graph next = make_graph({ 0, 1 });
    CHECK(run_graph(e.get(), next));
    CHECK(same(read_out(next), expect_cols({ { rows.A.data() }, { rows.A.data() } })));
    CHECK(contains(pyactadd_engine_last_error(e.get()), "no batch declared"));
    // A token path llama.cpp does not compute (embd input) is not compared.
    CHECK(pyactadd_engine_declare_batch(e.get(), &b.b) == 0);
    graph_opts stale = with_tokens({ 7, 7, 7, 7 });
    stale.token_path_computed = false;
    graph embd = make_graph({ 0, 1, 0, 1 }, stale);
    CHECK(run_graph(e.get(), embd) && pyactadd_engine_batch_status(e.get()) == 0);
}

// Bound tensors without a declaration, or after it is used up: not applied, graph not
// stopped, status -3; a binding made after the declaration that splits a token: mismatch.
void scenario_undeclared(bool force) {
    const scenario_rows rows;
    engine_ptr e = sequence_engine(force, rows);
    const float * a = rows.A.data();
    graph g = make_graph({ 0, 1 });
    bool go = false;
    CHECK(run_graph(e.get(), g, &go) && go);
    CHECK(same(read_out(g), expect_cols({ { a }, { a } })));
    CHECK(pyactadd_engine_batch_status(e.get()) == PYACTADD_STATUS_BATCH_MISMATCH);
    CHECK(pyactadd_engine_get_stats(e.get()).n_batch_mismatches == 1);
    declared_batch b({ { 20, 0, { 1 } }, { 21, 1, { 1 } } });
    CHECK(pyactadd_engine_declare_batch(e.get(), &b.b) == 0);
    graph used = make_graph({ 0, 1 });
    graph after = make_graph({ 0, 1 });
    CHECK(run_graph(e.get(), used) && pyactadd_engine_batch_status(e.get()) == 0);
    CHECK(same(read_out(used), expect_cols({ { rows.r0, a }, { rows.r1, a } })));
    CHECK(run_graph(e.get(), after));
    CHECK(same(read_out(after), expect_cols({ { a }, { a } })));
    CHECK(pyactadd_engine_batch_status(e.get()) == PYACTADD_STATUS_BATCH_MISMATCH);
    CHECK(contains(pyactadd_engine_last_error(e.get()), "no batch declared"));
    // Without bound tensors nothing needs a declaration.
    CHECK(pyactadd_engine_set_sequences(e.get(), 0, nullptr, 0) == 0);
    CHECK(pyactadd_engine_declare_batch(e.get(), nullptr) == 0);
    graph plain = make_graph({ 0, 1 });
    CHECK(run_graph(e.get(), plain) && pyactadd_engine_batch_status(e.get()) == 0);
    // Bound after declaring, to part of a shared token's sequences.
    declared_batch shared({ { 1, 0, { 0, 1 } } });
    CHECK(pyactadd_engine_declare_batch(e.get(), &shared.b) == 0);
    const int32_t one[] = { 1 };
    CHECK(pyactadd_engine_set_sequences(e.get(), 0, one, 1) == 0);
    graph split = make_graph({ 0 });
    CHECK(run_graph(e.get(), split, &go) && !go);
    CHECK(contains(pyactadd_engine_last_error(e.get()), "belongs to sequences {0, 1}"));
    CHECK(same(read_out(split), std::vector<float>(N_EMBD, 0.0f)));
}

void test_graph_scenarios(bool force) {
    std::fprintf(stderr, "graph scenarios, %s path\n", force ? "device-copy" : "host");
    scenario_front(force);
    scenario_offset(force);
    scenario_all_plus_front(force);
    scenario_two_sequences(force);
    scenario_positions_found_elsewhere(force);
    scenario_bad_layer_output(force);
    scenario_no_positions_input(force);
    scenario_switching_paths(force);
    scenario_capture(force);
    scenario_capture_stop(force);
    scenario_bound_sequences(force);
    scenario_split_batch(force);
    scenario_batch_mismatch(force);
    scenario_undeclared(force);
}

// pyactadd_engine_load_file must return `code` with `msg` in the error and leave the engine unchanged.
void check_refused(pyactadd_engine * e, const fs::path & path, float coeff, const char * msg,
                   int32_t code = PYACTADD_STATUS_ERROR) {
    const int32_t before = pyactadd_engine_count(e);
    const int32_t n = pyactadd_engine_load_file(e, path.string().c_str(), coeff);
    if (n != code || !contains(pyactadd_engine_last_error(e), msg)) {
        std::fprintf(stderr, "  %s: returned %d, error '%s' (wanted %d, '%s')\n", path.filename().string().c_str(), n,
                     pyactadd_engine_last_error(e), code, msg);
    }
    CHECK(n == code);
    CHECK(contains(pyactadd_engine_last_error(e), msg));
    CHECK(pyactadd_engine_count(e) == before);
}

// Missing, empty, garbage, truncated files, and bad arguments.
void test_load_file_unreadable(const fs::path & dir, const fs::path & good) {
    engine_ptr e = make_engine();
    check_refused(e.get(), dir / "missing.gguf", 1.0f, "missing.gguf");
    write_bytes(dir / "empty.gguf", "");
    check_refused(e.get(), dir / "empty.gguf", 1.0f, "cannot read");
    std::string garbage(4096, '\0');
    for (size_t i = 0; i < garbage.size(); ++i) {
        garbage[i] = (char) ((i * 2654435761u) >> 13);
    }
    write_bytes(dir / "garbage.gguf", garbage);
    check_refused(e.get(), dir / "garbage.gguf", 1.0f, "cannot read");
    write_bytes(dir / "magic-only.gguf", "GGUF" + garbage);
    check_refused(e.get(), dir / "magic-only.gguf", 1.0f, "cannot read");
    const std::string whole = read_bytes(good);
    for (size_t keep : { whole.size() / 4, whole.size() / 2, whole.size() - 1 }) {
        write_bytes(dir / "truncated.gguf", whole.substr(0, keep));
        check_refused(e.get(), dir / "truncated.gguf", 1.0f, "cannot read");
    }
    CHECK(pyactadd_engine_load_file(e.get(), nullptr, 1.0f) == -1);
    check_refused(e.get(), good, std::numeric_limits<float>::quiet_NaN(), "finite");
    check_refused(e.get(), good, std::numeric_limits<float>::infinity(), "finite");
}

// Well-formed GGUF that is not a steering file for this engine.
void test_load_file_wrong_content(const fs::path & dir) {
    engine_ptr e = make_engine();
    auto refused = [&](const char * name, const char * arch, const std::vector<file_tensor> & tensors, const char * msg,
                       const char * alignment = "front") {
        CHECK(write_gguf(dir / name, arch, alignment, tensors));
        check_refused(e.get(), dir / name, 1.0f, msg);
    };
    refused("llama.gguf", "llama", { direction(3, 2) }, "not a control-vector file");
    refused("noarch.gguf", nullptr, { direction(3, 2) }, "not a control-vector file");
    refused("empty-cvec.gguf", "controlvector", {}, "no direction tensors");
    refused("back.gguf", "controlvector", { direction(3, 2) }, "prompt length", "back");
    refused("middle.gguf", "controlvector", { direction(3, 2) }, "unknown alignment", "middle");
    file_tensor odd = direction(3, 2);
    odd.name = "steer.3";
    refused("name.gguf", "controlvector", { odd }, "unexpected tensor");
    odd.name = "direction.3a";
    refused("name2.gguf", "controlvector", { odd }, "unexpected tensor");
    refused("layer.gguf", "controlvector", { direction(N_LAYER - 1, 2) }, "out of range");
    file_tensor narrow = direction(3, 2);
    narrow.ne[0] = N_EMBD / 2;
    narrow.ne[1] = 4;
    refused("narrow.gguf", "controlvector", { narrow }, "n_embd");
    file_tensor nan = direction(3, 2);
    nan.data[3] = std::numeric_limits<float>::quiet_NaN();
    refused("nan.gguf", "controlvector", { nan }, "NaN");
    file_tensor half = direction(3, 2);
    half.type = GGML_TYPE_F16;
    refused("f16.gguf", "controlvector", { half }, "F32");
    file_tensor cube = direction(3, 2);
    cube.ne = { N_EMBD, 1, 2 };
    refused("3d.gguf", "controlvector", { cube }, "dimensions");
    // All or nothing: a good tensor before a bad one is not kept.
    refused("half-good.gguf", "controlvector", { direction(1, 2), direction(N_LAYER + 3, 2) }, "out of range");
    CHECK(pyactadd_engine_count(e.get()) == 0);
}

// Valid files: per-position rows scaled by coeff, front-aligned; a stock 1-D file at every position.
void test_load_file_valid(const fs::path & dir, const fs::path & good) {
    engine_ptr e = make_engine();
    CHECK(pyactadd_engine_load_file(e.get(), good.string().c_str(), 2.0f) == 2);
    CHECK(pyactadd_engine_count(e.get()) == 2);
    CHECK(std::strcmp(pyactadd_engine_last_error(e.get()), "") == 0);
    const std::vector<float> R2 = rows_of(2, 2.0f);
    graph g = make_graph({ 0, 1, 2 });
    CHECK(run_graph(e.get(), g));
    CHECK(same(read_out(g), expect_cols({ { R2.data() }, { R2.data() + N_EMBD }, {} })));
    const std::vector<float> R6 = rows_of(2, 6.0f); // direction.1 was written x3, loaded x2
    graph g1 = make_graph({ 0, 1 }, { "l_out-1" });
    CHECK(run_graph(e.get(), g1));
    CHECK(same(read_out(g1), expect_cols({ { R6.data() }, { R6.data() + N_EMBD } })));
    // Ids continue after a load, so remove() works on loaded tensors too.
    CHECK(pyactadd_engine_remove(e.get(), 0) == 0);
    CHECK(pyactadd_engine_remove(e.get(), 1) == 0);
    CHECK(pyactadd_engine_count(e.get()) == 0);

    // llama.cpp's own 1-D control vector (no alignment key): row 0 at every position.
    CHECK(write_gguf(dir / "stock.gguf", "controlvector", nullptr, { direction(3, 0) }));
    CHECK(pyactadd_engine_load_file(e.get(), (dir / "stock.gguf").string().c_str(), -1.0f) == 1);
    const std::vector<float> S = rows_of(1, -1.0f);
    graph gs = make_graph({ 7, 8, 9 });
    CHECK(run_graph(e.get(), gs));
    CHECK(same(read_out(gs), expect_cols({ { S.data() }, { S.data() }, { S.data() } })));
}

void test_load_file(const fs::path & dir) {
    const fs::path good = dir / "good.gguf";
    CHECK(write_gguf(good, "controlvector", "front", { direction(3, 2), direction(1, 2, 3.0f) }));
    test_load_file_unreadable(dir, good);
    test_load_file_wrong_content(dir);
    test_load_file_valid(dir, good);
}

// --- pyactadd_file_read_info -----------------------------------------------------------

// A file as pyactadd writes it: fingerprint, anchor, front alignment, two 3-row layers.
void test_file_info_pyactadd(const fs::path & dir) {
    file_meta m;
    m.alignment = "front";
    m.anchor = "<|im_start|>";
    m.anchor_id = 1;
    m.fingerprint = true;
    const fs::path path = dir / "info.gguf";
    CHECK(write_gguf(path, m, { direction(4, 3), direction(2, 3) }));
    pyactadd_file_info info;
    std::memset(&info, 0x5a, sizeof(info)); // every field must be written
    CHECK(pyactadd_file_read_info(path.string().c_str(), &info) == 0);
    CHECK(std::strcmp(info.error, "") == 0);
    CHECK(info.source == PYACTADD_FILE_SOURCE_PYACTADD);
    CHECK(info.alignment == PYACTADD_FILE_ALIGN_FRONT);
    CHECK(std::strcmp(info.anchor, "<|im_start|>") == 0 && info.anchor_token_id == 1);
    CHECK(info.has_fingerprint && std::strcmp(info.model_architecture, "llama") == 0);
    CHECK(info.model_n_embd == N_EMBD && info.model_n_layer == N_LAYER && info.model_n_vocab == 1000);
    CHECK(info.n_positions == 3 && info.n_layers == 2 && info.layers[0] == 2 && info.layers[1] == 4);

    m.alignment = "back";
    CHECK(write_gguf(dir / "info-back.gguf", m, { direction(4, 3) }));
    CHECK(pyactadd_file_read_info((dir / "info-back.gguf").string().c_str(), &info) == 0);
    CHECK(info.alignment == PYACTADD_FILE_ALIGN_BACK && info.n_layers == 1);
}

// A stock llama.cpp control vector: no pyactadd keys at all.
void test_file_info_stock(const fs::path & dir) {
    file_meta m;
    m.anchor_id_key = false;
    const fs::path path = dir / "info-stock.gguf";
    CHECK(write_gguf(path, m, { direction(5, 0), direction(1, 0) }));
    pyactadd_file_info info;
    CHECK(pyactadd_file_read_info(path.string().c_str(), &info) == 0);
    CHECK(info.source == PYACTADD_FILE_SOURCE_LLAMA_CPP && info.alignment == PYACTADD_FILE_ALIGN_ALL);
    CHECK(std::strcmp(info.anchor, "none") == 0 && info.anchor_token_id == -1);
    CHECK(!info.has_fingerprint && info.model_architecture[0] == '\0');
    CHECK(info.model_n_embd == N_EMBD && info.model_n_layer == 0 && info.model_n_vocab == 0);
    CHECK(info.n_positions == 1 && info.n_layers == 2 && info.layers[0] == 1 && info.layers[1] == 5);
}

// NULL arguments and bad files: -1, the reason in error, every other field zero.
void test_file_info_refused(const fs::path & dir) {
    pyactadd_file_info info;
    CHECK(pyactadd_file_read_info(nullptr, nullptr) == PYACTADD_STATUS_ERROR);
    CHECK(pyactadd_file_read_info((dir / "info.gguf").string().c_str(), nullptr) == PYACTADD_STATUS_ERROR);
    CHECK(pyactadd_file_read_info(nullptr, &info) == PYACTADD_STATUS_ERROR && contains(info.error, "no file name"));
    auto refused = [&](const fs::path & path, const char * msg) {
        std::memset(&info, 0x5a, sizeof(info));
        CHECK(pyactadd_file_read_info(path.string().c_str(), &info) == PYACTADD_STATUS_ERROR);
        if (!contains(info.error, msg)) {
            std::fprintf(stderr, "  %s: error '%s' (wanted '%s')\n", path.filename().string().c_str(), info.error, msg);
        }
        CHECK(contains(info.error, msg));
        CHECK(info.n_layers == 0 && info.model_n_embd == 0 && info.anchor[0] == '\0');
    };
    refused(dir / "missing.gguf", "cannot read");
    refused(dir / "garbage.gguf", "cannot read");
    refused(dir / "llama.gguf", "not a control-vector file");
    refused(dir / "middle.gguf", "unknown alignment");
    refused(dir / "name.gguf", "unexpected tensor");
    file_meta m;
    m.fingerprint = true;
    m.n_embd = N_EMBD + 1;
    CHECK(write_gguf(dir / "info-width.gguf", m, { direction(3, 2) }));
    refused(dir / "info-width.gguf", "pyactadd.model.n_embd");
    file_meta typed;
    typed.anchor_id_key = false;
    typed.float_key = "pyactadd.anchor_token_id";
    CHECK(write_gguf(dir / "info-type.gguf", typed, { direction(3, 2) }));
    refused(dir / "info-type.gguf", "pyactadd.anchor_token_id should be an integer");
    CHECK(write_gguf(dir / "info-none.gguf", file_meta(), {}));
    refused(dir / "info-none.gguf", "no direction tensors");
    // An engine without a model loads a file whatever model it names (n_embd permitting).
    engine_ptr e = make_engine();
    CHECK(pyactadd_engine_load_file(e.get(), (dir / "info.gguf").string().c_str(), 1.0f) == 2);
}

void test_file_info(const fs::path & dir) {
    test_file_info_pyactadd(dir);
    test_file_info_stock(dir);
    test_file_info_refused(dir);
}

// --- an engine given the model (engine_test MODEL.gguf) --------------------------------

struct model_deleter {
    void operator()(llama_model * m) const { llama_model_free(m); }
};

// A direction tensor as wide as the model: 2 rows, or 1-D for a stock file.
file_tensor model_direction(int il, int64_t n_embd, bool one_d = false) {
    file_tensor t;
    t.name = "direction." + std::to_string(il);
    t.ne = one_d ? std::vector<int64_t>{ n_embd } : std::vector<int64_t>{ n_embd, 2 };
    t.data.assign((size_t) n_embd * (one_d ? 1 : 2), 0.25f);
    return t;
}

// params.model fills n_embd and n_layer, and a non-zero one that differs is refused.
void test_engine_from_model(const llama_model * model) {
    pyactadd_engine_params p = pyactadd_engine_default_params();
    p.model = model;
    engine_ptr e(pyactadd_engine_create(p));
    CHECK(e != nullptr);
    const std::vector<float> row((size_t) llama_model_n_embd(model), 1.0f);
    const int32_t last = llama_model_n_layer(model) - 2;
    CHECK(pyactadd_engine_add(e.get(), last, row.data(), 1, (int32_t) row.size(), 0, PYACTADD_ALIGN_ALL) == 0);
    CHECK(pyactadd_engine_add(e.get(), last + 1, row.data(), 1, (int32_t) row.size(), 0, PYACTADD_ALIGN_ALL) == -1);
    p.n_embd = llama_model_n_embd(model) + 1;
    CHECK(pyactadd_engine_create(p) == nullptr);
    p.n_embd = llama_model_n_embd(model);
    p.n_layer = llama_model_n_layer(model);
    engine_ptr same_sizes(pyactadd_engine_create(p));
    CHECK(same_sizes != nullptr);
}

// Files for this model load; files naming another one are refused with -2 and the fix.
void test_load_file_for_model(const fs::path & dir, const llama_model * model) {
    pyactadd_engine_params p = pyactadd_engine_default_params();
    p.model = model;
    engine_ptr e(pyactadd_engine_create(p));
    char arch[64] = "";
    CHECK(llama_model_meta_val_str(model, "general.architecture", arch, sizeof(arch)) > 0);
    const int64_t n_embd = llama_model_n_embd(model);
    file_meta m;
    m.alignment = "front";
    m.fingerprint = true;
    m.model_arch = arch;
    m.n_embd = (uint32_t) n_embd;
    m.n_layer = (uint32_t) llama_model_n_layer(model);
    m.n_vocab = (uint32_t) llama_vocab_n_tokens(llama_model_get_vocab(model));
    const std::vector<file_tensor> tensors = { model_direction(5, n_embd) };
    auto path_for = [&](const char * name, const file_meta & meta) {
        CHECK(write_gguf(dir / name, meta, tensors));
        return dir / name;
    };
    const fs::path fits = path_for("fits.gguf", m);
    CHECK(pyactadd_engine_load_file(e.get(), fits.string().c_str(), 1.0f) == 1);

    const char * fix = "re-extract the vector for this model";
    file_meta other = m;
    other.n_vocab = m.n_vocab + 1;
    check_refused(e.get(), path_for("vocab.gguf", other), 1.0f, "(n_vocab", PYACTADD_STATUS_MODEL_MISMATCH);
    check_refused(e.get(), dir / "vocab.gguf", 1.0f, fix, PYACTADD_STATUS_MODEL_MISMATCH);
    other = m;
    other.model_arch = "gemma3";
    check_refused(e.get(), path_for("arch.gguf", other), 1.0f, "(architecture gemma3 !=", PYACTADD_STATUS_MODEL_MISMATCH);
    other = m;
    other.n_layer = m.n_layer + 2;
    check_refused(e.get(), path_for("nlayer.gguf", other), 1.0f, "(n_layer", PYACTADD_STATUS_MODEL_MISMATCH);

    // What a file leaves unknown is not compared; a stock file is checked on n_embd only.
    other = m;
    other.model_arch = "";
    other.n_vocab = 0;
    CHECK(pyactadd_engine_load_file(e.get(), path_for("unknown.gguf", other).string().c_str(), 1.0f) == 1);
    file_meta stock;
    stock.anchor_id_key = false;
    CHECK(write_gguf(dir / "stock-model.gguf", stock, { model_direction(5, n_embd, true) }));
    CHECK(pyactadd_engine_load_file(e.get(), (dir / "stock-model.gguf").string().c_str(), 1.0f) == 1);
    CHECK(write_gguf(dir / "stock-narrow.gguf", stock, { direction(5, 0) }));
    check_refused(e.get(), dir / "stock-narrow.gguf", 1.0f, "(n_embd", PYACTADD_STATUS_MODEL_MISMATCH);
    CHECK(pyactadd_engine_count(e.get()) == 3);
}

// Returns false when the model cannot be loaded (a test failure in itself).
bool test_with_model(const fs::path & dir, const char * model_path) {
    // The weights too: a vocab-only load leaves llama_model_n_embd and n_layer at 0.
    llama_model_params mp = llama_model_default_params();
    std::unique_ptr<llama_model, model_deleter> model(llama_model_load_from_file(model_path, mp));
    CHECK(model != nullptr);
    if (!model) {
        return false;
    }
    test_engine_from_model(model.get());
    test_load_file_for_model(dir, model.get());
    std::fprintf(stderr, "model checks run on %s\n", model_path);
    return true;
}

void quiet_log(ggml_log_level /*level*/, const char * /*text*/, void * /*user_data*/) {
    // gguf's own complaints about the broken files are expected here; the engine's
    // last_error is what the test checks.
}

} // namespace

// Usage: engine_test [MODEL.gguf]; with a model, the checks of an engine given one run too.
int main(int argc, char ** argv) {
    ggml_log_set(quiet_log, nullptr);
    llama_log_set(quiet_log, nullptr);
    std::error_code ec;
    const fs::path dir = fs::temp_directory_path() / ("pyactadd-engine-test-" + std::to_string((long) ::getpid()));
    fs::create_directories(dir, ec);
    if (ec) {
        std::fprintf(stderr, "engine_test: error: cannot create %s: %s\n", dir.string().c_str(), ec.message().c_str());
        return 1;
    }

    CHECK(engine_test_c_smoke() == 0);
    test_create_and_null_handles();
    test_add_validation();
    test_remove_and_clear();
    test_attach();
    test_chained_callback();
    test_callback_degenerate_input();
    test_capture_validation();
    test_set_sequences_validation();
    test_declare_validation();
    test_graph_scenarios(false);
    test_graph_scenarios(true);
    test_load_file(dir);
    test_file_info(dir);
    if (argc > 1) {
        llama_backend_init();
        test_with_model(dir, argv[1]);
        llama_backend_free();
    }

    fs::remove_all(dir, ec);
    std::fprintf(stderr, "engine_test: %d checks, %d failed\n", g_checks, g_failures);
    return g_failures == 0 ? 0 : 1;
}
