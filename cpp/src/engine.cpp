// The steering engine behind pyactadd.h. See the header for the contract.
//
// Nothing here throws across the C boundary: every entry point validates its input,
// catches allocation failures and reports them through last_error.

#include "pyactadd.h"

#include "ggml-backend.h"
#include "ggml.h"
#include "gguf.h"

#include <algorithm>
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
    std::vector<int32_t> seqs; // bound sequence ids, sorted and unique; empty: every token

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

// The token ids input, "inp_tokens" (or the scheduler's copy of it, as for inp_pos).
bool is_tokens_input(const ggml_tensor * t) {
    if (t == nullptr || t->type != GGML_TYPE_I32) {
        return false;
    }
    return std::strcmp(t->name, "inp_tokens") == 0 || std::strstr(t->name, "#inp_tokens#") != nullptr;
}

// One token of a declared batch; its sequence ids are seqs[seq_first .. seq_first + n_seq).
struct declared_token {
    int32_t token; // -1 for embd input
    int32_t pos;
    size_t seq_first;
    int32_t n_seq;
};

// How many of the n ids are in the sorted set.
int32_t count_in(const std::vector<int32_t> & set, const int32_t * ids, int32_t n) {
    int32_t k = 0;
    for (int32_t i = 0; i < n; ++i) {
        k += std::binary_search(set.begin(), set.end(), ids[i]) ? 1 : 0;
    }
    return k;
}

std::string seq_list(const int32_t * ids, size_t n) {
    std::string out = "{";
    for (size_t i = 0; i < n; ++i) {
        out += (i ? ", " : "") + std::to_string(ids[i]);
    }
    return out + "}";
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

// The rows copied from one layer output in capture mode, in the order computed.
struct captured_layer {
    std::vector<float> rows;        // n * n_embd
    std::vector<int32_t> positions; // n: each row's position (inp_pos), -1 when the graph has none
};

struct gguf_deleter {
    void operator()(gguf_context * c) const { gguf_free(c); }
};
struct ggml_deleter {
    void operator()(ggml_context * c) const { ggml_free(c); }
};
using gguf_ptr = std::unique_ptr<gguf_context, gguf_deleter>;
using ggml_ptr = std::unique_ptr<ggml_context, ggml_deleter>;

// --- reading a steering file's metadata ------------------------------------------------
// The keys and their meaning are pyactadd/vector/gguf_file.py's (docs/format.md); a
// reader error is a std::string naming the file and, where there is one, the fix.

constexpr const char * FIX_CORRUPT = "re-create it with `pyactadd extract` or restore a good copy";

// A GGUF opened with its tensor metadata, and with the tensor data unless no_alloc.
struct gguf_file {
    gguf_ptr g;
    ggml_ptr ctx;
};

bool open_gguf(const char * path, bool no_alloc, gguf_file * out, std::string * err) {
    ggml_context * raw_ctx = nullptr;
    gguf_init_params gp = { /*.no_alloc =*/ no_alloc, /*.ctx =*/ &raw_ctx };
    out->g.reset(gguf_init_from_file(path, gp));
    out->ctx.reset(raw_ctx);
    if (!out->g || !out->ctx) {
        *err = std::string("cannot read ") + path + " as a GGUF file";
        return false;
    }
    return true;
}

// The value of an integer key of any integer type in *out; false (with *err) when the
// key is there but not an integer or out of int32 range; *out is untouched when absent.
bool read_int_key(const gguf_context * g, const char * path, const char * key, int64_t * out, std::string * err) {
    const int64_t k = gguf_find_key(g, key);
    if (k < 0) {
        return true;
    }
    int64_t v = 0;
    switch (gguf_get_kv_type(g, k)) {
        case GGUF_TYPE_UINT8:  v = gguf_get_val_u8(g, k); break;
        case GGUF_TYPE_INT8:   v = gguf_get_val_i8(g, k); break;
        case GGUF_TYPE_UINT16: v = gguf_get_val_u16(g, k); break;
        case GGUF_TYPE_INT16:  v = gguf_get_val_i16(g, k); break;
        case GGUF_TYPE_UINT32: v = gguf_get_val_u32(g, k); break;
        case GGUF_TYPE_INT32:  v = gguf_get_val_i32(g, k); break;
        case GGUF_TYPE_INT64:  v = gguf_get_val_i64(g, k); break;
        case GGUF_TYPE_UINT64:
            v = gguf_get_val_u64(g, k) > (uint64_t) INT32_MAX ? (int64_t) INT32_MAX + 1 : (int64_t) gguf_get_val_u64(g, k);
            break;
        default:
            *err = std::string(path) + ": " + key + " should be an integer: " + FIX_CORRUPT;
            return false;
    }
    if (v < INT32_MIN || v > INT32_MAX) {
        *err = std::string(path) + ": " + key + " = " + std::to_string(v) + " is out of range: " + FIX_CORRUPT;
        return false;
    }
    *out = v;
    return true;
}

// Copies a string key into buf (buf keeps its content when the key is absent).
bool read_str_key(const gguf_context * g, const char * path, const char * key, char * buf, size_t size, std::string * err) {
    const int64_t k = gguf_find_key(g, key);
    if (k < 0) {
        return true;
    }
    if (gguf_get_kv_type(g, k) != GGUF_TYPE_STRING) {
        *err = std::string(path) + ": " + key + " should be a string: " + FIX_CORRUPT;
        return false;
    }
    const char * v = gguf_get_val_str(g, k);
    if (std::strlen(v) >= size) {
        *err = std::string(path) + ": " + key + " is longer than " + std::to_string(size - 1) + " bytes";
        return false;
    }
    std::strcpy(buf, v);
    return true;
}

bool has_pyactadd_keys(const gguf_context * g) {
    for (int64_t i = 0; i < gguf_get_n_kv(g); ++i) {
        if (std::strncmp(gguf_get_key(g, i), "pyactadd.", 9) == 0) {
            return true;
        }
    }
    return false;
}

// "direction.<il>" -> il, or -1 for any other name.
int32_t direction_index(const char * name) {
    if (std::strncmp(name, "direction.", 10) != 0) {
        return -1;
    }
    char * end = nullptr;
    const long v = std::strtol(name + 10, &end, 10);
    return (end != name + 10 && *end == '\0' && name[10] >= '0' && name[10] <= '9' && v < 1000000) ? (int32_t) v : -1;
}

// Layers, n_positions and the rows' width from the direction tensors' names and shapes.
bool read_tensor_shapes(const gguf_file & f, const char * path, pyactadd_file_info * info, std::string * err) {
    const int64_t n_tensors = gguf_get_n_tensors(f.g.get());
    if (n_tensors == 0) {
        *err = std::string(path) + " holds no direction tensors";
        return false;
    }
    if (n_tensors > PYACTADD_FILE_MAX_LAYERS) {
        *err = std::string(path) + " holds " + std::to_string(n_tensors) + " tensors, more than the " +
               std::to_string(PYACTADD_FILE_MAX_LAYERS) + " a steering file may have";
        return false;
    }
    for (int64_t i = 0; i < n_tensors; ++i) {
        const char * name = gguf_get_tensor_name(f.g.get(), i);
        const int32_t il = direction_index(name);
        const ggml_tensor * t = ggml_get_tensor(f.ctx.get(), name);
        if (il < 0 || t == nullptr) {
            *err = std::string(path) + ": unexpected tensor '" + name + "' (want direction.<il>)";
            return false;
        }
        if (i == 0) {
            info->model_n_embd = (int32_t) t->ne[0];
            info->n_positions = (int32_t) t->ne[1];
        }
        info->layers[i] = il;
    }
    info->n_layers = (int32_t) n_tensors;
    std::sort(info->layers, info->layers + info->n_layers);
    return true;
}

bool read_alignment(const gguf_context * g, const char * path, pyactadd_file_info * info, std::string * err) {
    char text[PYACTADD_FILE_MAX_TEXT] = "all";
    if (!read_str_key(g, path, "pyactadd.alignment", text, sizeof(text), err)) {
        return false;
    }
    const std::string a = text;
    if (a != "front" && a != "back" && a != "all") {
        *err = std::string(path) + ": unknown alignment '" + a + "' (pyactadd.alignment is front, back or all)";
        return false;
    }
    info->alignment = a == "front" ? PYACTADD_FILE_ALIGN_FRONT : a == "back" ? PYACTADD_FILE_ALIGN_BACK : PYACTADD_FILE_ALIGN_ALL;
    return true;
}

// pyactadd.anchor, pyactadd.anchor_token_id and the pyactadd.model.* fingerprint.
bool read_pyactadd_keys(const gguf_context * g, const char * path, pyactadd_file_info * info, std::string * err) {
    int64_t anchor_id = -1, n_embd = 0, n_layer = 0, n_vocab = 0;
    if (!read_str_key(g, path, "pyactadd.anchor", info->anchor, sizeof(info->anchor), err) ||
        !read_int_key(g, path, "pyactadd.anchor_token_id", &anchor_id, err) ||
        !read_str_key(g, path, "pyactadd.model.architecture", info->model_architecture, sizeof(info->model_architecture), err) ||
        !read_int_key(g, path, "pyactadd.model.n_embd", &n_embd, err) ||
        !read_int_key(g, path, "pyactadd.model.n_layer", &n_layer, err) ||
        !read_int_key(g, path, "pyactadd.model.n_vocab", &n_vocab, err)) {
        return false;
    }
    if (anchor_id < -1 || n_layer < 0 || n_vocab < 0) {
        *err = std::string(path) + ": negative anchor_token_id, model.n_layer or model.n_vocab: " + FIX_CORRUPT;
        return false;
    }
    if (n_embd != 0 && n_embd != info->model_n_embd) {
        *err = std::string(path) + ": pyactadd.model.n_embd is " + std::to_string(n_embd) + " but the tensors are " +
               std::to_string(info->model_n_embd) + " wide: " + FIX_CORRUPT;
        return false;
    }
    info->anchor_token_id = (int32_t) anchor_id;
    info->model_n_layer = (int32_t) n_layer;
    info->model_n_vocab = (int32_t) n_vocab;
    for (const char * key : { "pyactadd.model.architecture", "pyactadd.model.n_embd", "pyactadd.model.n_layer", "pyactadd.model.n_vocab" }) {
        info->has_fingerprint = info->has_fingerprint || gguf_find_key(g, key) >= 0;
    }
    return true;
}

// Everything pyactadd_file_info holds, from an opened file; *info must be zeroed.
bool read_info(const gguf_file & f, const char * path, pyactadd_file_info * info, std::string * err) {
    const gguf_context * g = f.g.get();
    const int64_t arch_key = gguf_find_key(g, "general.architecture");
    if (arch_key < 0 || gguf_get_kv_type(g, arch_key) != GGUF_TYPE_STRING ||
        std::strcmp(gguf_get_val_str(g, arch_key), "controlvector") != 0) {
        *err = std::string(path) + " is not a control-vector file (general.architecture != controlvector)";
        return false;
    }
    std::strcpy(info->anchor, "none");
    info->anchor_token_id = -1;
    info->source = has_pyactadd_keys(g) ? PYACTADD_FILE_SOURCE_PYACTADD : PYACTADD_FILE_SOURCE_LLAMA_CPP;
    return read_tensor_shapes(f, path, info, err) && read_alignment(g, path, info, err) && read_pyactadd_keys(g, path, info, err);
}

// The model an engine steers, as the file fingerprint names it.
struct model_fingerprint {
    bool known = false;
    std::string architecture;
    int32_t n_embd = 0, n_layer = 0, n_vocab = 0;
};

model_fingerprint fingerprint_of(const llama_model * model) {
    model_fingerprint m;
    if (model == nullptr) {
        return m;
    }
    char arch[PYACTADD_FILE_MAX_TEXT] = "";
    if (llama_model_meta_val_str(model, "general.architecture", arch, sizeof(arch)) < 0) {
        arch[0] = '\0';
    }
    m.known = true;
    m.architecture = arch;
    m.n_embd = llama_model_n_embd(model);
    m.n_layer = llama_model_n_layer(model);
    m.n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    return m;
}

std::string describe(const std::string & arch, int32_t n_embd, int32_t n_layer, int32_t n_vocab) {
    std::string d = (arch.empty() ? std::string("an unknown architecture") : arch) + " with n_embd " + std::to_string(n_embd);
    d += n_layer > 0 ? ", n_layer " + std::to_string(n_layer) : "";
    d += n_vocab > 0 ? ", n_vocab " + std::to_string(n_vocab) : "";
    return d;
}

// "" when the file fits the model; else what differs. Fields the file leaves unknown are
// not compared (as ModelFingerprint.mismatch in Python); n_embd is always compared.
std::string fingerprint_mismatch(const pyactadd_file_info & info, const model_fingerprint & m) {
    const std::string arch = info.has_fingerprint ? info.model_architecture : "";
    if (!arch.empty() && !m.architecture.empty() && arch != m.architecture) {
        return "architecture " + arch + " != " + m.architecture;
    }
    if (info.model_n_embd != m.n_embd) {
        return "n_embd " + std::to_string(info.model_n_embd) + " != " + std::to_string(m.n_embd);
    }
    if (info.has_fingerprint && info.model_n_layer > 0 && info.model_n_layer != m.n_layer) {
        return "n_layer " + std::to_string(info.model_n_layer) + " != " + std::to_string(m.n_layer);
    }
    if (info.has_fingerprint && info.model_n_vocab > 0 && info.model_n_vocab != m.n_vocab) {
        return "n_vocab " + std::to_string(info.model_n_vocab) + " != " + std::to_string(m.n_vocab);
    }
    return "";
}

void copy_error(const std::string & msg, pyactadd_file_info * out) {
    const size_t n = std::min(msg.size(), sizeof(out->error) - 1);
    std::memcpy(out->error, msg.data(), n);
    out->error[n] = '\0';
}

} // namespace

struct pyactadd_engine {
    pyactadd_engine_params params;
    model_fingerprint model; // of params.model, read at create; known = false without one
    std::vector<steering_tensor> tensors;
    std::vector<std::vector<size_t>> by_layer; // il -> indices into tensors
    int32_t next_id = 0;

    ggml_backend_sched_eval_callback chained_cb = nullptr;
    void * chained_user_data = nullptr;
    ggml_abort_callback chained_abort = nullptr;
    void * chained_abort_data = nullptr;

    // Capture mode: the layers copied out, their rows so far, and the early stop.
    std::map<int32_t, captured_layer> captured; // il -> rows (empty: capture off)
    int32_t capture_deepest = -1;
    bool capture_stop = false; // stop the graph once capture_deepest is copied
    bool stopping = false;     // that point is passed: skip the rest (cleared by capture_clear)
    bool we_capture = false;

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

    // The declared batch (pyactadd_engine_declare_batch) and how far its micro-batches got.
    std::vector<declared_token> declared; // empty: none declared
    std::vector<int32_t> declared_seqs;
    size_t cursor = 0;           // declared tokens already matched by micro-batches
    int32_t n_micro_batches = 0; // micro-batches checked since the declaration
    int32_t batch_status = 0;
    bool batch_stop = false;     // a mismatch: refuse the rest of the graph, abort it
    bool attached_non_unified = false; // some context params had kv_unified = false
    // The current micro-batch: whether bound tensors apply, and its first declared token.
    bool bound_ok = false;
    size_t micro_first = 0;
    const ggml_tensor * tokens_input = nullptr; // seen in this graph, on the token path
    std::vector<int32_t> token_ids; // host copy of the current micro-batch's tokens

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

    bool any_bound() const {
        return std::any_of(tensors.begin(), tensors.end(), [](const steering_tensor & s) { return !s.seqs.empty(); });
    }

    // Whether tensor s is added to token i of the current micro-batch (bound tensors: all
    // of the token's declared sequences are bound).
    bool applies(const steering_tensor & s, int64_t i) const {
        if (s.seqs.empty()) {
            return true;
        }
        if (!bound_ok) {
            return false;
        }
        const declared_token & d = declared[micro_first + i];
        return count_in(s.seqs, declared_seqs.data() + d.seq_first, d.n_seq) == d.n_seq;
    }

    // The row s adds to token i of the current micro-batch, or nullptr (positions read).
    const float * row_for(const steering_tensor & s, int64_t i) const {
        return applies(s, i) ? s.row_at(positions[i], params.n_embd) : nullptr;
    }

    // "" when every bound tensor takes all or none of the sequences of each declared token
    // in [first, end); else which token and tensor do not.
    std::string partly_bound(size_t first, size_t end) const {
        for (size_t i = first; i < end; ++i) {
            const declared_token & d = declared[i];
            const int32_t * ids = declared_seqs.data() + d.seq_first;
            for (const steering_tensor & s : tensors) {
                const int32_t k = s.seqs.empty() ? 0 : count_in(s.seqs, ids, d.n_seq);
                if (k > 0 && k < d.n_seq) {
                    return "token " + std::to_string(i) + " belongs to sequences " + seq_list(ids, d.n_seq) +
                           " but tensor " + std::to_string(s.id) + " is bound to " + seq_list(s.seqs.data(), s.seqs.size()) +
                           ": steering it would change the other sequences too; decode shared tokens before binding, "
                           "or bind the tensor to all of their sequences";
                }
            }
        }
        return "";
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
        if (il < 0 || il >= params.n_layer || by_layer[il].empty() || batch_stop) {
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
            for (size_t i = 0; i < positions.size(); ++i) {
                if (row_for(tensors[idx], (int64_t) i) != nullptr) {
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
                if (row_for(tensors[idx], i) != nullptr) {
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
                const float * row = row_for(tensors[idx], i);
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

    // True when il is a captured layer and t has the layout capture copies.
    bool wants_capture(int32_t il, const ggml_tensor * t) {
        if (captured.find(il) == captured.end()) {
            return false;
        }
        if (t->type != GGML_TYPE_F32 || t->ne[0] != params.n_embd || t->nb[0] != sizeof(float)) {
            stats.n_errors++;
            fail("layer output " + std::string(t->name) + " is not an F32 [n_embd, n_tokens] tensor; not captured");
            return false;
        }
        return true;
    }

    // Appends the token rows of the computed layer output t (and their positions) to il's capture.
    void capture(int32_t il, const ggml_tensor * t) {
        const int64_t n_embd = params.n_embd;
        const int64_t n_tokens = t->ne[1];
        captured_layer & c = captured[il];
        const size_t first_row = c.positions.size();
        c.rows.resize((first_row + n_tokens) * n_embd);
        const bool host = ggml_backend_buffer_is_host(t->buffer) && !params.force_device_copy;
        const size_t span_bytes = (n_tokens - 1) * t->nb[1] + n_embd * sizeof(float);
        const char * base;
        if (host) {
            base = static_cast<const char *>(t->data);
        } else {
            scratch.resize((span_bytes + sizeof(float) - 1) / sizeof(float));
            ggml_backend_tensor_get(t, scratch.data(), 0, span_bytes);
            stats.n_device_copies++;
            base = reinterpret_cast<const char *>(scratch.data());
        }
        for (int64_t i = 0; i < n_tokens; ++i) {
            std::memcpy(c.rows.data() + (first_row + i) * n_embd, base + i * t->nb[1], n_embd * sizeof(float));
        }
        // Positions are optional here (a graph without inp_pos still has rows to copy).
        const bool have_positions = positions_input != nullptr && read_positions(n_tokens);
        for (int64_t i = 0; i < n_tokens; ++i) {
            c.positions.push_back(have_positions ? positions[i] : -1);
        }
        stats.n_rows_captured += (uint64_t) n_tokens;
    }

    // A mismatch: nothing more is steered; with stop, the rest of the graph is refused and
    // aborted (so no logits come from it) and the declaration is forgotten.
    void mismatch(const std::string & msg, bool stop) {
        batch_status = PYACTADD_STATUS_BATCH_MISMATCH;
        stats.n_batch_mismatches++;
        fail(msg);
        bound_ok = false;
        if (stop) {
            batch_stop = true;
            declared.clear();
            declared_seqs.clear();
        }
    }

    // The graph's token ids into token_ids, when its token input is in host memory.
    bool read_tokens(const ggml_tensor * tok, int64_t n_tokens) {
        if (tok == nullptr || tok->buffer == nullptr || !ggml_backend_buffer_is_host(tok->buffer) || ggml_nelements(tok) < n_tokens) {
            return false;
        }
        token_ids.assign(static_cast<const int32_t *>(tok->data), static_cast<const int32_t *>(tok->data) + n_tokens);
        return true;
    }

    // "" when the micro-batch of n_tokens (positions read) is the declared batch's next tokens.
    std::string micro_batch_difference(int64_t n_tokens, const ggml_tensor * tok) {
        const bool have_tokens = read_tokens(tok, n_tokens);
        for (int64_t i = 0; i < n_tokens; ++i) {
            const declared_token & d = declared[cursor + i];
            if (positions[i] != d.pos) {
                return "token " + std::to_string(i) + " has position " + std::to_string(positions[i]) +
                       ", the declared batch has " + std::to_string(d.pos) + " there";
            }
            if (have_tokens && d.token >= 0 && token_ids[i] != d.token) {
                return "token " + std::to_string(i) + " (position " + std::to_string(d.pos) + ") is token id " +
                       std::to_string(token_ids[i]) + ", the declared batch has " + std::to_string(d.token) + " there";
            }
        }
        // set_sequences may have bound a tensor since the declaration.
        return partly_bound(cursor, cursor + (size_t) n_tokens);
    }

    // At a graph's first layer output t: checks the micro-batch against the declaration and
    // decides whether bound tensors apply to it.
    void begin_micro_batch(const ggml_tensor * t) {
        positions_valid = false;
        bound_ok = false;
        const ggml_tensor * tok = tokens_input;
        tokens_input = nullptr; // a later graph on the embd path must not see this one's
        if (cursor >= declared.size()) {
            if (any_bound()) {
                mismatch("no batch declared: tensors bound to sequences were not added to this graph; call "
                         "pyactadd_engine_declare_batch before each llama_decode", false);
            }
            return;
        }
        const std::string where = "micro-batch " + std::to_string(n_micro_batches++) + " (from declared token " +
                                  std::to_string(cursor) + "): ";
        const int64_t n_tokens = t->ne[1];
        const size_t left = declared.size() - cursor;
        if (n_tokens > (int64_t) left) {
            mismatch(where + std::to_string(n_tokens) + " tokens, the declared batch has " + std::to_string(left) + " left", true);
            return;
        }
        if (!read_positions(n_tokens)) {
            mismatch(where + last_error, true);
            return;
        }
        const std::string diff = micro_batch_difference(n_tokens, tok);
        if (!diff.empty()) {
            mismatch(where + diff, true);
            return;
        }
        micro_first = cursor;
        cursor += (size_t) n_tokens;
        bound_ok = true;
    }

    // The node-level protocol of ggml_backend_sched (see ggml_backend_sched_eval_callback).
    // After the deepest captured layer with capture_stop, every node is asked for and
    // refused on its second call: the CPU backend's abort callback then ends the graph
    // after one more node (llama_decode returns 2), and backends without one stop at the
    // end of each remaining split.
    bool on_eval(ggml_tensor * t, bool ask) {
        const bool halted = stopping || batch_stop;
        if (ask) {
            note_inputs(t);
            const int32_t il = layer_output_index(t->name);
            if (il >= 0) {
                if (il <= last_il_seen || last_il_seen < 0) {
                    begin_micro_batch(t);
                }
                last_il_seen = il;
            }
            const bool now_halted = stopping || batch_stop; // begin_micro_batch may have stopped it
            asked_node = t;
            we_asked = il >= 0 && wants(il, t);
            we_capture = il >= 0 && !now_halted && wants_capture(il, t);
            chained_asked = !now_halted && chained_cb != nullptr && chained_cb(t, true, chained_user_data);
            return we_asked || we_capture || chained_asked || now_halted;
        }
        const bool mine = t == asked_node;
        const int32_t il = mine ? layer_output_index(t->name) : -1;
        if (mine && we_asked) {
            apply(il, t);
        }
        if (mine && we_capture) {
            capture(il, t);
        }
        if (mine && we_capture && capture_stop && il == capture_deepest) {
            stopping = true;
            stats.n_graph_stops++;
        }
        const bool keep_going = !(mine && chained_asked) || chained_cb(t, false, chained_user_data);
        asked_node = nullptr;
        we_asked = we_capture = chained_asked = false;
        return keep_going && !halted;
    }

    // Remembers the positions and token inputs this node reads (the token input only on
    // the path llama.cpp computes: a graph holds both the token and the embd path).
    void note_inputs(const ggml_tensor * t) {
        bool found_positions = false;
        for (int i = 0; i < GGML_MAX_SRC; ++i) {
            if (!found_positions && is_positions_input(t->src[i])) {
                positions_input = t->src[i];
                found_positions = true;
            }
            if (is_tokens_input(t->src[i]) && (t->flags & GGML_TENSOR_FLAG_COMPUTE) != 0) {
                tokens_input = t->src[i];
            }
        }
    }

    int32_t set_sequences(int32_t id, const int32_t * seq_ids, int32_t n_seq) {
        if (n_seq < 0 || (n_seq > 0 && seq_ids == nullptr)) {
            fail("set_sequences needs n_seq >= 0 sequence ids");
            return -1;
        }
        for (int32_t i = 0; i < n_seq; ++i) {
            if (seq_ids[i] < 0) {
                fail("sequence id " + std::to_string(seq_ids[i]) + " is negative: llama.cpp's sequence ids are 0 or more");
                return -1;
            }
        }
        const auto found = std::find_if(tensors.begin(), tensors.end(), [id](const steering_tensor & s) { return s.id == id; });
        if (found == tensors.end()) {
            fail("no steering tensor with id " + std::to_string(id));
            return -1;
        }
        std::vector<int32_t> seqs(seq_ids, seq_ids + n_seq);
        std::sort(seqs.begin(), seqs.end());
        seqs.erase(std::unique(seqs.begin(), seqs.end()), seqs.end());
        found->seqs.swap(seqs);
        return 0;
    }

    // Forgets the declaration, its status and any stop after a mismatch.
    void forget_batch() {
        declared.clear();
        declared_seqs.clear();
        cursor = 0;
        n_micro_batches = 0;
        batch_status = 0;
        batch_stop = false;
        bound_ok = false;
        // The next layer output starts a micro-batch, whatever layer the last graph ended on.
        last_il_seen = -1;
        positions_valid = false;
    }

    // "" when batch can be declared; else why not.
    std::string batch_problem(const llama_batch & batch) const {
        if (attached_non_unified) {
            return "the engine is attached to a context created with kv_unified = false; declared batches need "
                   "llama_context_params.kv_unified = true (a unified KV cache keeps the batch's token order)";
        }
        if (batch.n_tokens < 1 || batch.pos == nullptr || batch.n_seq_id == nullptr || batch.seq_id == nullptr) {
            return "a declared batch needs n_tokens >= 1 and its pos, n_seq_id and seq_id arrays";
        }
        for (int32_t i = 0; i < batch.n_tokens; ++i) {
            if (batch.n_seq_id[i] < 1 || batch.seq_id[i] == nullptr) {
                return "token " + std::to_string(i) + " of the declared batch has no sequence id";
            }
            for (int32_t k = 0; k < batch.n_seq_id[i]; ++k) {
                if (batch.seq_id[i][k] < 0) {
                    return "token " + std::to_string(i) + " of the declared batch has a negative sequence id";
                }
            }
        }
        return "";
    }

    int32_t declare_batch(const llama_batch * batch) {
        forget_batch();
        if (batch == nullptr) {
            return 0;
        }
        std::string problem = batch_problem(*batch);
        for (int32_t i = 0; problem.empty() && i < batch->n_tokens; ++i) {
            declared.push_back({ batch->token ? batch->token[i] : -1, batch->pos[i], declared_seqs.size(), batch->n_seq_id[i] });
            declared_seqs.insert(declared_seqs.end(), batch->seq_id[i], batch->seq_id[i] + batch->n_seq_id[i]);
        }
        if (problem.empty()) {
            problem = partly_bound(0, declared.size());
        }
        if (!problem.empty()) {
            forget_batch();
            fail(problem);
            return -1;
        }
        return 0;
    }

    int32_t capture_set(const int32_t * layers, int32_t n_layers, bool stop_after) {
        if (n_layers < 0 || (n_layers > 0 && layers == nullptr)) {
            fail("capture needs n_layers >= 0 layer indices");
            return -1;
        }
        std::map<int32_t, captured_layer> wanted;
        for (int32_t i = 0; i < n_layers; ++i) {
            if (layers[i] < 0 || layers[i] > params.n_layer - 2) {
                fail("capture layer index il=" + std::to_string(layers[i]) + " out of range: use 0 to " +
                     std::to_string(params.n_layer - 2) + " (l_out-<il>, the input of block il+1)");
                return -1;
            }
            wanted[layers[i]];
        }
        captured.swap(wanted);
        capture_deepest = captured.empty() ? -1 : captured.rbegin()->first;
        capture_stop = stop_after && !captured.empty();
        stopping = false;
        return 0;
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

    // Adds every direction tensor of an opened file, scaled by coeff; false (with
    // last_error naming the tensor) at the first one that does not fit.
    bool add_file_tensors(const gguf_file & f, const char * path, pyactadd_align align, float coeff) {
        for (int64_t i = 0; i < gguf_get_n_tensors(f.g.get()); ++i) {
            const char * name = gguf_get_tensor_name(f.g.get(), i);
            const ggml_tensor * t = ggml_get_tensor(f.ctx.get(), name);
            if (t->type != GGML_TYPE_F32 || ggml_n_dims(t) > 2) {
                fail(std::string(path) + ": tensor " + name + " must be F32 with 1 or 2 dimensions");
                return false;
            }
            const float * data = static_cast<const float *>(t->data);
            std::vector<float> rows(data, data + ggml_nelements(t));
            for (float & v : rows) {
                v *= coeff;
            }
            if (add(direction_index(name), rows.data(), (int32_t) t->ne[1], (int32_t) t->ne[0], 0, align) < 0) {
                fail(std::string(path) + ": " + name + ": " + last_error);
                return false;
            }
        }
        return true;
    }

    // Moves every tensor of a staged engine into this one, with new ids.
    int32_t take(pyactadd_engine & staged) {
        for (steering_tensor & s : staged.tensors) {
            s.id = next_id++;
            tensors.push_back(std::move(s));
        }
        rebuild_index();
        return (int32_t) staged.tensors.size();
    }

    // Reads and checks the file, stages its tensors, then takes them (all or nothing).
    int32_t load_file(const char * path, float coeff) {
        std::string err;
        gguf_file f;
        pyactadd_file_info info = {};
        if (!open_gguf(path, /*no_alloc =*/ false, &f, &err) || !read_info(f, path, &info, &err)) {
            fail(err);
            return PYACTADD_STATUS_ERROR;
        }
        if (info.alignment == PYACTADD_FILE_ALIGN_BACK) {
            fail(std::string(path) + ": alignment 'back' needs the prompt length; add its rows with pyactadd_engine_add and an offset");
            return PYACTADD_STATUS_ERROR;
        }
        if (model.known) {
            const std::string diff = fingerprint_mismatch(info, model);
            if (!diff.empty()) {
                fail(std::string(path) + " was made for " +
                     describe(info.model_architecture, info.model_n_embd, info.model_n_layer, info.model_n_vocab) +
                     " but the model is " + describe(model.architecture, model.n_embd, model.n_layer, model.n_vocab) + " (" +
                     diff + "): re-extract the vector for this model");
                return PYACTADD_STATUS_MODEL_MISMATCH;
            }
        }
        // Staged in a second engine so a bad tensor leaves this one unchanged.
        pyactadd_engine staged;
        staged.params = params;
        staged.rebuild_index();
        const pyactadd_align align = info.alignment == PYACTADD_FILE_ALIGN_ALL ? PYACTADD_ALIGN_ALL : PYACTADD_ALIGN_POSITIONS;
        if (!staged.add_file_tensors(f, path, align, coeff)) {
            fail(staged.last_error);
            return PYACTADD_STATUS_ERROR;
        }
        return take(staged);
    }
};

extern "C" {

pyactadd_engine_params pyactadd_engine_default_params(void) {
    pyactadd_engine_params p;
    p.n_embd = 0;
    p.n_layer = 0;
    p.force_device_copy = false;
    p.model = nullptr;
    return p;
}

pyactadd_engine * pyactadd_engine_create(pyactadd_engine_params params) {
    try {
        const model_fingerprint model = fingerprint_of(params.model);
        if (model.known) {
            if ((params.n_embd != 0 && params.n_embd != model.n_embd) || (params.n_layer != 0 && params.n_layer != model.n_layer)) {
                return nullptr;
            }
            params.n_embd = model.n_embd;
            params.n_layer = model.n_layer;
            params.model = nullptr; // not kept: the model may go before the engine
        }
        if (params.n_embd <= 0 || params.n_layer < 2) {
            return nullptr;
        }
        std::unique_ptr<pyactadd_engine> e(new pyactadd_engine());
        e->params = params;
        e->model = model;
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
        return PYACTADD_STATUS_ERROR;
    }
    try {
        engine->last_error.clear();
        if (path == nullptr) {
            engine->fail("no file name given");
            return PYACTADD_STATUS_ERROR;
        }
        if (!std::isfinite(coeff)) {
            engine->fail("coefficient must be finite");
            return PYACTADD_STATUS_ERROR;
        }
        return engine->load_file(path, coeff);
    } catch (const std::bad_alloc &) {
        engine->fail("out of memory while loading a steering file");
        return PYACTADD_STATUS_ERROR;
    } catch (...) {
        engine->fail("unexpected error while loading a steering file");
        return PYACTADD_STATUS_ERROR;
    }
}

int32_t pyactadd_file_read_info(const char * path, pyactadd_file_info * out) {
    if (out == nullptr) {
        return PYACTADD_STATUS_ERROR;
    }
    std::memset(out, 0, sizeof(*out));
    if (path == nullptr) {
        copy_error("no file name given", out);
        return PYACTADD_STATUS_ERROR;
    }
    try {
        std::string err;
        gguf_file f;
        if (open_gguf(path, /*no_alloc =*/ true, &f, &err) && read_info(f, path, out, &err)) {
            return 0;
        }
        std::memset(out, 0, sizeof(*out));
        copy_error(err, out);
    } catch (const std::bad_alloc &) {
        std::memset(out, 0, sizeof(*out));
        copy_error("out of memory while reading a steering file", out);
    } catch (...) {
        std::memset(out, 0, sizeof(*out));
        copy_error("unexpected error while reading a steering file", out);
    }
    return PYACTADD_STATUS_ERROR;
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

int32_t pyactadd_engine_set_sequences(pyactadd_engine * engine, int32_t id, const int32_t * seq_ids, int32_t n_seq) {
    if (engine == nullptr) {
        return -1;
    }
    try {
        engine->last_error.clear();
        return engine->set_sequences(id, seq_ids, n_seq);
    } catch (...) {
        engine->fail("out of memory while binding a steering tensor to sequences");
        return -1;
    }
}

int32_t pyactadd_engine_declare_batch(pyactadd_engine * engine, const llama_batch * batch) {
    if (engine == nullptr) {
        return -1;
    }
    try {
        engine->last_error.clear();
        return engine->declare_batch(batch);
    } catch (...) {
        engine->forget_batch();
        engine->fail("out of memory while copying a declared batch");
        return -1;
    }
}

int32_t pyactadd_engine_batch_status(const pyactadd_engine * engine) {
    return engine == nullptr ? PYACTADD_STATUS_ERROR : engine->batch_status;
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
    if (params->abort_callback != pyactadd_engine_abort_callback) {
        engine->chained_abort = params->abort_callback;
        engine->chained_abort_data = params->abort_callback_data;
    }
    params->abort_callback = pyactadd_engine_abort_callback;
    params->abort_callback_data = engine;
    engine->attached_non_unified = engine->attached_non_unified || !params->kv_unified;
    return 0;
}

bool pyactadd_engine_abort_callback(void * user_data) {
    auto * engine = static_cast<pyactadd_engine *>(user_data);
    if (engine == nullptr) {
        return false;
    }
    if (engine->batch_stop) {
        // The CPU backend ends the graph on this answer, so the next graph is not stopped.
        engine->batch_stop = false;
        return true;
    }
    return engine->stopping || (engine->chained_abort != nullptr && engine->chained_abort(engine->chained_abort_data));
}

int32_t pyactadd_engine_capture(pyactadd_engine * engine, const int32_t * layers, int32_t n_layers, bool stop_after) {
    if (engine == nullptr) {
        return PYACTADD_STATUS_ERROR;
    }
    try {
        engine->last_error.clear();
        return engine->capture_set(layers, n_layers, stop_after);
    } catch (...) {
        engine->fail("out of memory while setting the captured layers");
        return PYACTADD_STATUS_ERROR;
    }
}

void pyactadd_engine_capture_clear(pyactadd_engine * engine) {
    if (engine == nullptr) {
        return;
    }
    for (auto & entry : engine->captured) {
        entry.second = captured_layer();
    }
    engine->stopping = false;
}

int32_t pyactadd_engine_capture_n_rows(const pyactadd_engine * engine, int32_t il) {
    if (engine == nullptr) {
        return PYACTADD_STATUS_ERROR;
    }
    const auto found = engine->captured.find(il);
    return found == engine->captured.end() ? PYACTADD_STATUS_ERROR : (int32_t) found->second.positions.size();
}

int32_t pyactadd_engine_capture_read(const pyactadd_engine * engine, int32_t il, float * rows, int32_t * positions,
                                     int32_t n_rows_max) {
    if (engine == nullptr || rows == nullptr || n_rows_max < 0) {
        return PYACTADD_STATUS_ERROR;
    }
    const auto found = engine->captured.find(il);
    if (found == engine->captured.end()) {
        return PYACTADD_STATUS_ERROR;
    }
    const captured_layer & c = found->second;
    const int32_t n = std::min(n_rows_max, (int32_t) c.positions.size());
    if (n == 0) {
        return 0; // nothing to copy (and an empty vector's data() may be NULL, which memcpy must not get)
    }
    std::memcpy(rows, c.rows.data(), (size_t) n * engine->params.n_embd * sizeof(float));
    if (positions != nullptr) {
        std::memcpy(positions, c.positions.data(), (size_t) n * sizeof(int32_t));
    }
    return n;
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
