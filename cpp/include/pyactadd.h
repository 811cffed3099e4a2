// pyactadd.h: per-position activation addition (ActAdd) for llama.cpp.
//
// The engine installs itself as a llama_context's eval callback (cb_eval). For every
// micro-batch it reads the positions the graph computes and, for each steered layer
// whose rows fall in that micro-batch, adds those rows to the layer's output
// (graph node "l_out-<il>") in place. Micro-batches with no steered position ask the
// scheduler for nothing, so generation past the steered span runs at full speed.
//
// Buffers that are not host memory (RPC, CUDA, Metal) are read and written with
// ggml_backend_tensor_get/set: the positions once per graph (the engine takes a layer
// index not above the last one it saw, l_out-0 in llama.cpp's graphs, as the start of a
// new graph), then one read and one write per steered layer with rows in the micro-batch.
//
// Layers are llama.cpp block-output indices: il steers "l_out-<il>", the residual
// stream entering block il + 1 (the same tensor llama.cpp's control vector
// "direction.<il>" is added to). Valid: 0 <= il <= n_layer - 2.
//
// Several sequences in one batch: an unbound tensor (the default) is matched by position
// only, so its row for position p is added to every token at position p, whatever its
// sequence. pyactadd_engine_set_sequences binds a tensor to sequence ids; it is then added
// only to tokens whose sequences are all bound, and the engine must be told which sequence
// each token of a graph belongs to: pyactadd_engine_declare_batch(engine, &batch) before
// each llama_decode (contexts created with kv_unified = true). llama.cpp then cuts the
// batch into consecutive micro-batches (split_simple); for each one the engine checks
// that its tokens are the declared batch's next ones (count, positions and, when the
// token input is in host memory, token ids) and steers bound tensors by the declared
// sequences. A micro-batch that is not (a split that reorders tokens, another batch
// than declared) is never steered wrongly: the engine steers nothing more, records why
// in last_error, counts it in n_batch_mismatches and stops the graph through the abort
// callback (llama_decode returns 2 on the CPU and removes the micro-batch from the KV
// cache; earlier micro-batches of that decode stay in it); pyactadd_engine_batch_status
// then says PYACTADD_STATUS_BATCH_MISMATCH. A graph computed while bound tensors exist
// but no declared tokens are left is not stopped: unbound tensors are added as always,
// bound ones are not, and the status becomes a mismatch ("no batch declared").
// Check pyactadd_engine_batch_status after each llama_decode that has bound tensors.
//
// Thread safety: none. Change steering between llama_decode calls, never during one.
//
// Typical use:
//
//     struct pyactadd_engine_params ep = pyactadd_engine_default_params();
//     ep.model = model;                                          // n_embd, n_layer and the fingerprint from it
//     pyactadd_engine * eng = pyactadd_engine_create(ep);
//     pyactadd_engine_load_file(eng, "love.gguf", 1.0f);       // or pyactadd_engine_add()
//     struct llama_context_params cp = llama_context_default_params();
//     pyactadd_engine_attach(eng, &cp);                          // before llama_init_from_model
//     struct llama_context * ctx = llama_init_from_model(model, cp);
//     ... llama_decode(ctx, batch) ...
//     llama_free(ctx);
//     pyactadd_engine_free(eng);                                 // after the context is gone
//
// What a steering file says about itself (alignment, anchor token, the model it was made
// for, its layers) comes from pyactadd_file_read_info(), so no application reads the
// file's GGUF keys itself.

#ifndef PYACTADD_H
#define PYACTADD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "llama.h"

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#    define PYACTADD_API __declspec(dllexport)
#else
#    define PYACTADD_API __attribute__((visibility("default")))
#endif

// 2: pyactadd_engine_params.model, pyactadd_file_info, pyactadd_file_read_info().
// 3: capture mode (pyactadd_engine_capture*), pyactadd_engine_abort_callback, two more stats.
// 4: sequence-bound steering, declared batches (pyactadd_engine_set_sequences,
//    pyactadd_engine_declare_batch, pyactadd_engine_batch_status), stats.n_batch_mismatches.
#define PYACTADD_ABI_VERSION 4

typedef struct pyactadd_engine pyactadd_engine;

// How the rows of a steering tensor map to sequence positions.
enum pyactadd_align {
    PYACTADD_ALIGN_POSITIONS = 0, // row r is added at position r + offset (front alignment: offset 0)
    PYACTADD_ALIGN_ALL       = 1, // row 0 is added at every position, like llama.cpp's control vectors
};

struct pyactadd_engine_params {
    int32_t n_embd;            // the model's embedding width (llama_model_n_embd); 0: take it from model
    int32_t n_layer;           // the model's block count (llama_model_n_layer); 0: take it from model
    bool    force_device_copy; // go through ggml_backend_tensor_get/set even for host buffers
                               // (the path CUDA and Metal buffers take), so CPU tests cover it
    const struct llama_model * model; // optional: the model steered. pyactadd_engine_load_file then refuses
                               // a file whose fingerprint names another model. Read once by
                               // pyactadd_engine_create (it need not outlive the engine)
};

// Return codes of pyactadd_engine_load_file, pyactadd_file_read_info and
// pyactadd_engine_batch_status, besides success.
enum pyactadd_status {
    PYACTADD_STATUS_ERROR          = -1, // a NULL or invalid argument, a missing or malformed file, a shape that does not fit
    PYACTADD_STATUS_MODEL_MISMATCH = -2, // the file was made for another model than the engine's params.model
    PYACTADD_STATUS_BATCH_MISMATCH = -3, // a micro-batch was not the declared batch's next tokens
};

// A steering file's own account of itself (pyactadd_file_read_info). The gguf keys
// named are those docs/format.md describes.
#define PYACTADD_FILE_MAX_TEXT   256 // bytes of each text field, the terminating NUL included
#define PYACTADD_FILE_MAX_LAYERS 512 // direction tensors a file may hold
#define PYACTADD_FILE_MAX_ERROR  512 // bytes of pyactadd_file_info.error (a longer message is cut)

enum pyactadd_file_source {
    PYACTADD_FILE_SOURCE_PYACTADD  = 0, // written by pyactadd: pyactadd.* metadata
    PYACTADD_FILE_SOURCE_LLAMA_CPP = 1, // a stock llama.cpp control vector (cvector-generator, repeng): no pyactadd.* keys
};

// pyactadd.alignment: where row 0 of each direction tensor goes in a prompt of n_prompt tokens.
enum pyactadd_file_align {
    PYACTADD_FILE_ALIGN_FRONT = 0, // "front": row r at position r
    PYACTADD_FILE_ALIGN_BACK  = 1, // "back": the last row at the last prompt position (offset n_prompt - n_positions)
    PYACTADD_FILE_ALIGN_ALL   = 2, // "all": one row, at every position (stock control vectors, and files without the key)
};

struct pyactadd_file_info {
    enum pyactadd_file_source source;
    enum pyactadd_file_align  alignment;
    char    anchor[PYACTADD_FILE_MAX_TEXT]; // pyactadd.anchor: "none", "bos" or the anchor token's text ("none" when absent)
    int32_t anchor_token_id;        // pyactadd.anchor_token_id: the token the rows assume at position 0, or -1 for none
    bool    has_fingerprint;        // the file names its model (pyactadd.model.*); false for stock control vectors
    char    model_architecture[PYACTADD_FILE_MAX_TEXT]; // pyactadd.model.architecture ("llama", ...); "" when unknown
    int32_t model_n_embd;           // width of the rows (the tensors' first dimension; pyactadd.model.n_embd agrees)
    int32_t model_n_layer;          // pyactadd.model.n_layer; 0 when unknown
    int32_t model_n_vocab;          // pyactadd.model.n_vocab; 0 when unknown
    int32_t n_positions;            // rows per direction tensor (1 for 1-D tensors)
    int32_t n_layers;               // direction tensors in the file, 1 to PYACTADD_FILE_MAX_LAYERS
    int32_t layers[PYACTADD_FILE_MAX_LAYERS]; // their llama.cpp indices il, ascending: direction.<il> steers l_out-<il>
    char    error[PYACTADD_FILE_MAX_ERROR]; // why pyactadd_file_read_info failed; "" on success
};

struct pyactadd_engine_stats {
    uint64_t n_layer_outputs_seen; // l_out nodes of steered layers seen by the callback
    uint64_t n_layer_outputs_steered; // of those, the ones the engine asked for and wrote into
    uint64_t n_rows_added;         // token rows that received a steering row
    uint64_t n_device_copies;      // ggml_backend_tensor_get/set calls made by the non-host path
    uint64_t n_errors;             // graph tensors the engine had to skip (see pyactadd_engine_last_error)
    uint64_t n_rows_captured;      // token rows copied out in capture mode
    uint64_t n_graph_stops;        // graphs stopped early after the deepest captured layer
    uint64_t n_batch_mismatches;   // micro-batches that were not the declared batch's next tokens,
                                   // or computed with bound tensors and no batch declared
};

// Defaults: n_embd = 0, n_layer = 0 (set both, or model), force_device_copy = false, model = NULL.
PYACTADD_API struct pyactadd_engine_params pyactadd_engine_default_params(void);

// Returns a new engine, or NULL when n_embd <= 0 or n_layer < 2 (after taking any 0 from
// model), or when a non-zero n_embd or n_layer differs from model's.
PYACTADD_API pyactadd_engine * pyactadd_engine_create(struct pyactadd_engine_params params);

// Frees the engine. Free every context it is attached to first. NULL is a no-op.
PYACTADD_API void pyactadd_engine_free(pyactadd_engine * engine);

// Adds a steering tensor of n_rows x n_embd floats (row-major, copied) to l_out-<il>.
// Several tensors may target the same layer; their rows add up.
// Returns an id >= 0 for pyactadd_engine_remove(), or -1 when an argument is invalid
// (il out of range, n_embd differs from the engine's, n_rows < 1, a NaN or inf value,
// ALIGN_ALL with n_rows != 1, offset < 0); the engine is unchanged then.
PYACTADD_API int32_t pyactadd_engine_add(
        pyactadd_engine * engine,
                int32_t   il,
            const float * data,
                int32_t   n_rows,
                int32_t   n_embd,
                int32_t   offset,
     enum pyactadd_align   align);

// Loads every direction tensor of a GGUF control-vector file (pyactadd's per-position
// files and llama.cpp's 1-D files), scaled by coeff, aligned as the file says: rows
// from position 0 for "front", row 0 at every position for "all" and for llama.cpp's
// own 1-D files. A "back" file needs the prompt length: use pyactadd_engine_add().
// With params.model set, a file's model fingerprint (pyactadd.model.architecture,
// n_embd, n_layer, n_vocab; fields it leaves unknown are not compared) must match the
// model; a file without one (a stock control vector) is checked on n_embd only.
// Returns the number of tensors added (>= 1), or, with the engine unchanged:
//   PYACTADD_STATUS_ERROR (-1): engine or path NULL, coeff not finite, a missing or
//       malformed file, a shape that does not fit the engine;
//   PYACTADD_STATUS_MODEL_MISMATCH (-2): the file was made for another model; the
//       message names both and the fix (re-extract the vector for this model).
PYACTADD_API int32_t pyactadd_engine_load_file(pyactadd_engine * engine, const char * path, float coeff);

// Reads what the steering file at path says about itself (metadata and tensor names and
// shapes; the rows are not read, so their type and values are checked only on loading).
// Returns 0 with out->error = "", or PYACTADD_STATUS_ERROR (-1) when path or out is NULL
// or the file is missing, not a control-vector GGUF, holds a malformed pyactadd.* key,
// an unknown alignment, or more than PYACTADD_FILE_MAX_LAYERS tensors; then out->error
// (when out is not NULL) holds the reason and the other fields are zero.
// Needs no engine or model; safe to call from several threads.
PYACTADD_API int32_t pyactadd_file_read_info(const char * path, struct pyactadd_file_info * out);

// Removes the tensor with this id. Returns 0, or -1 when no tensor has that id.
PYACTADD_API int32_t pyactadd_engine_remove(pyactadd_engine * engine, int32_t id);

// Removes every tensor. Attached contexts keep running, unsteered.
PYACTADD_API void pyactadd_engine_clear(pyactadd_engine * engine);

// Number of tensors held.
PYACTADD_API int32_t pyactadd_engine_count(const pyactadd_engine * engine);

// Switches the non-host (ggml-backend get/set) path on or off for host buffers too.
PYACTADD_API void pyactadd_engine_set_force_device_copy(pyactadd_engine * engine, bool force);

// Binds tensor id to the sequences seq_ids[0 .. n_seq) (copied; repeats allowed): it is
// then added only to tokens whose sequences (llama_batch.seq_id) are all in that set, and
// only in graphs of a declared batch (pyactadd_engine_declare_batch). ALIGN_ALL tensors
// too: row 0 at every position of those tokens. n_seq = 0 unbinds it: every token, by
// position (the default). Returns 0, or -1 (engine unchanged) when no tensor has that id,
// n_seq < 0, seq_ids is NULL with n_seq > 0, or a sequence id is negative.
PYACTADD_API int32_t pyactadd_engine_set_sequences(pyactadd_engine * engine, int32_t id, const int32_t * seq_ids, int32_t n_seq);

// Declares the batch the next llama_decode computes: n_tokens, token (or -1 for each
// token when token is NULL: embd input), pos, n_seq_id and seq_id are copied. Every
// micro-batch of that decode is checked against the declaration's next tokens (a cursor
// that advances micro-batch by micro-batch): its token count, its positions (read once
// per micro-batch) and, when the graph's token input is in host memory (where llama.cpp
// keeps it), its token ids; bound tensors are steered by the declared sequences. NULL
// forgets the declaration. Every call resets pyactadd_engine_batch_status to 0 and ends
// a stop after a mismatch. Returns 0, or -1 with no declaration left (a later decode
// counts as undeclared) when: batch->pos, n_seq_id or seq_id is NULL, n_tokens < 1, a
// token has n_seq_id < 1 or a negative sequence id, a token belongs partly to a bound
// tensor's sequences (steering half of a shared token would change the other sequence
// too), or the engine was attached to context params with kv_unified = false (only a
// unified KV cache keeps a batch's tokens in order across micro-batches).
PYACTADD_API int32_t pyactadd_engine_declare_batch(pyactadd_engine * engine, const struct llama_batch * batch);

// 0 when every micro-batch since the last declare matched it (or nothing was declared and
// no tensor is bound); PYACTADD_STATUS_BATCH_MISMATCH (-3) after a micro-batch that did
// not (last_error says what differed) or a graph computed with bound tensors and no
// declared tokens left. -1 for a NULL engine. Reset by pyactadd_engine_declare_batch.
PYACTADD_API int32_t pyactadd_engine_batch_status(const pyactadd_engine * engine);

// Installs the engine as params->cb_eval with params->cb_eval_user_data = engine, and
// as params->abort_callback (data = engine), which capture mode's early stop uses.
// Callbacks already in params are chained: the eval callback is still called for every
// tensor and its answers are honoured (until an early stop, see pyactadd_engine_capture),
// and the abort callback is still asked. Records params->kv_unified: declared batches need
// every attached context unified. Call before llama_init_from_model(). Returns 0, or -1
// when params is NULL or the engine is already in params.
PYACTADD_API int32_t pyactadd_engine_attach(pyactadd_engine * engine, struct llama_context_params * params);

// The eval callback itself (user_data must be the engine), for applications that
// dispatch several callbacks themselves.
PYACTADD_API bool pyactadd_engine_eval_callback(struct ggml_tensor * t, bool ask, void * user_data);

// The abort callback attach installs (user_data must be the engine): true once an early
// stop is under way (see pyactadd_engine_capture) or once after a batch mismatch (see
// pyactadd_engine_declare_batch), else the chained callback's answer.
PYACTADD_API bool pyactadd_engine_abort_callback(void * user_data);

// --- capture mode ------------------------------------------------------------------------
// The engine can copy layer outputs out while llama_decode computes them: the residual
// stream entering chosen blocks, on the model's own (quantized) weights, on whatever
// device the layer runs (host buffers are read in place, others with
// ggml_backend_tensor_get). Rows are copied after any steering of that layer is added.
//
//     int32_t il[] = { 5, 15 };
//     pyactadd_engine_capture(eng, il, 2, true);      // after attach, before decoding
//     pyactadd_engine_capture_clear(eng);             // before each llama_decode
//     int rc = llama_decode(ctx, batch);              // 0, or 2 after an early stop: both fine
//     int32_t n = pyactadd_engine_capture_n_rows(eng, 15);
//     pyactadd_engine_capture_read(eng, 15, rows, positions, n);
//     llama_memory_clear(llama_get_memory(ctx), true); // the early stop left the cache partial
//
// Rows arrive in the order the graph computes its tokens (one micro-batch after another;
// within one, the batch's order for a unified KV cache), each with its position.

// Captures l_out-<il> for the n_layers indices in layers (0 <= il <= n_layer - 2, repeats
// allowed); n_layers = 0 turns capture off. Clears what was captured. With stop_after,
// once the deepest of them is copied the rest of the graph is skipped: the CPU backend's
// abort callback (installed by attach) aborts it, so llama_decode returns 2 and removes
// the micro-batch from the KV cache; on backends without an abort callback each remaining
// split stops after its first node and llama_decode returns 0. Either way the logits are
// not computed, the KV cache must be cleared before other use, and one llama_decode must
// fit in one micro-batch (n_ubatch >= its tokens): later micro-batches are not computed.
// Returns 0, or PYACTADD_STATUS_ERROR (-1), with the engine unchanged, when engine is
// NULL, n_layers < 0, layers is NULL with n_layers > 0, or an index is out of range.
PYACTADD_API int32_t pyactadd_engine_capture(pyactadd_engine * engine, const int32_t * layers, int32_t n_layers, bool stop_after);

// Forgets the captured rows and re-arms the early stop; call before each llama_decode.
PYACTADD_API void pyactadd_engine_capture_clear(pyactadd_engine * engine);

// Rows captured at il since the last clear, or -1 when engine is NULL or il is not captured.
PYACTADD_API int32_t pyactadd_engine_capture_n_rows(const pyactadd_engine * engine, int32_t il);

// Copies up to n_rows_max captured rows of il (n_embd floats each, row-major) into rows,
// and their positions (-1 for a graph without positions) into positions unless NULL.
// Returns the number of rows copied, or -1 when engine or rows is NULL, n_rows_max < 0,
// or il is not captured.
PYACTADD_API int32_t pyactadd_engine_capture_read(const pyactadd_engine * engine, int32_t il, float * rows,
                                                  int32_t * positions, int32_t n_rows_max);

PYACTADD_API struct pyactadd_engine_stats pyactadd_engine_get_stats(const pyactadd_engine * engine);
PYACTADD_API void pyactadd_engine_reset_stats(pyactadd_engine * engine);

// The last error message, or "" when none. Valid until the next call on this engine.
PYACTADD_API const char * pyactadd_engine_last_error(const pyactadd_engine * engine);

#ifdef __cplusplus
}
#endif

#endif // PYACTADD_H
