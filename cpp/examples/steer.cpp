// steer.cpp: steered greedy generation with a pyactadd file, in plain C++ on llama.cpp.
//
// The smallest complete use of the C API in pyactadd.h, in the phases of llama.cpp's
// examples/simple/simple.cpp. Decoding is greedy and every setting that changes the
// numbers is the one `pyactadd run` uses, so
//
//     pyactadd-steer -m MODEL -s love.gguf:5 -n 30 -p "I hate you because"
//
// prints the same text as
//
//     pyactadd run "I hate you because" -m MODEL --steer love.gguf:5 --temperature 0 --max-tokens 30
//
// (tests/test_c_api.py checks that). Build it with CMake (-DPYACTADD_BUILD_EXAMPLES=ON)
// or against an installed pyactadd:
//
//     c++ steer.cpp $(pyactadd config --cflags --libs) -o pyactadd-steer
//
// Output: stdout holds exactly the generated text (no prompt, no trailing newline), so
// scripts can compare it byte for byte. Errors: one "steer: error: ..." line on stderr
// and exit code 1.
//
// Anchors: a file extracted with `--anchor TOKEN` records that token
// (pyactadd.anchor_token_id) and its rows assume it sits at position 0. Like
// `pyactadd run`, this program prepends it to the prompt tokens unless they already
// start with it; files with different anchors cannot be combined.
//
// Not handled here: "back"-aligned files (the engine's loader refuses them because the
// offset depends on the prompt length; an application adds their rows itself with
// pyactadd_engine_add(..., offset = n_prompt - n_rows, ...)), chat templates, and the
// model-fingerprint check that `pyactadd run` does (the engine still refuses a file whose
// n_embd or layers do not fit the model).

#include "pyactadd.h"

#include "gguf.h"
#include "llama.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace {

struct steer_file {
    std::string path;
    float coeff = 1.0f;
};

struct options {
    std::string model;
    std::vector<steer_file> files;
    std::string prompt = "I hate you because";
    int n_predict = -1;
    int n_ctx = 2048;  // pyactadd run's default --n-ctx
    int n_threads = 0; // generation threads; 0: as pyactadd run (all cores, at most 8)
    bool no_steer = false;
};

void print_usage(const char * argv0) {
    std::fprintf(stderr,
                 "usage: %s -m MODEL -s FILE.gguf[:COEFF] [-s ...] -n N_PREDICT [-p PROMPT] [-c N_CTX] [-t THREADS] [--no-steer]\n"
                 "\n"
                 "Greedy generation with pyactadd steering files; prints only the generated text.\n"
                 "  -s FILE[:COEFF]  steering file; COEFF multiplies the file's own coefficient (default 1); repeatable\n"
                 "  -t THREADS       threads for generated tokens (like pyactadd run --threads); the prompt uses all cores\n"
                 "  --no-steer       read the files (and their anchor) but generate unsteered, for comparison\n",
                 argv0);
}

bool parse_int(const char * text, int min, int * out) {
    char * end = nullptr;
    errno = 0;
    const long v = std::strtol(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || v < min || v > 1000000000L) {
        return false;
    }
    *out = (int) v;
    return true;
}

// "FILE[:COEFF]": the text after the last ':' is a coefficient when it parses as one,
// else it is part of the file name (the rule `pyactadd run --steer` uses).
bool parse_steer(const char * text, steer_file * out) {
    out->path = text;
    out->coeff = 1.0f;
    const char * colon = std::strrchr(text, ':');
    if (colon == nullptr || colon == text || colon[1] == '\0') {
        return true;
    }
    char * end = nullptr;
    const float c = std::strtof(colon + 1, &end);
    if (*end != '\0') {
        return true;
    }
    if (!std::isfinite(c)) {
        return false;
    }
    out->path.assign(text, colon - text);
    out->coeff = c;
    return true;
}

// Returns 0 on success, 1 on bad arguments (after printing why).
int parse_args(int argc, char ** argv, options * opt) {
    for (int i = 1; i < argc; ++i) {
        const char * a = argv[i];
        const bool takes_value = std::strcmp(a, "-m") == 0 || std::strcmp(a, "-p") == 0 || std::strcmp(a, "-s") == 0 ||
                                 std::strcmp(a, "-n") == 0 || std::strcmp(a, "-c") == 0 || std::strcmp(a, "-t") == 0;
        if (takes_value && i + 1 >= argc) {
            std::fprintf(stderr, "steer: error: %s needs a value\n", a);
            return 1;
        }
        if (std::strcmp(a, "--no-steer") == 0) {
            opt->no_steer = true;
        } else if (std::strcmp(a, "-h") == 0 || std::strcmp(a, "--help") == 0) {
            print_usage(argv[0]);
            std::exit(0);
        } else if (std::strcmp(a, "-m") == 0) {
            opt->model = argv[++i];
        } else if (std::strcmp(a, "-p") == 0) {
            opt->prompt = argv[++i];
        } else if (std::strcmp(a, "-s") == 0) {
            steer_file f;
            if (!parse_steer(argv[++i], &f)) {
                std::fprintf(stderr, "steer: error: the coefficient in '%s' must be a finite number\n", argv[i]);
                return 1;
            }
            opt->files.push_back(f);
        } else if (std::strcmp(a, "-n") == 0) {
            if (!parse_int(argv[++i], 1, &opt->n_predict)) {
                std::fprintf(stderr, "steer: error: -n wants a whole number >= 1, got '%s'\n", argv[i]);
                return 1;
            }
        } else if (std::strcmp(a, "-c") == 0) {
            if (!parse_int(argv[++i], 16, &opt->n_ctx)) {
                std::fprintf(stderr, "steer: error: -c wants a whole number >= 16, got '%s'\n", argv[i]);
                return 1;
            }
        } else if (std::strcmp(a, "-t") == 0) {
            if (!parse_int(argv[++i], 1, &opt->n_threads)) {
                std::fprintf(stderr, "steer: error: -t wants a whole number >= 1, got '%s'\n", argv[i]);
                return 1;
            }
        } else {
            std::fprintf(stderr, "steer: error: unknown argument '%s'\n", a);
            return 1;
        }
    }
    if (opt->model.empty() || opt->n_predict < 1 || (opt->files.empty() && !opt->no_steer)) {
        print_usage(argv[0]);
        std::fprintf(stderr, "steer: error: -m, -n and (unless --no-steer) -s are required\n");
        return 1;
    }
    if (opt->prompt.empty()) {
        std::fprintf(stderr, "steer: error: empty prompt: give a non-empty text with -p\n");
        return 1;
    }
    return 0;
}

// The file's anchor token (pyactadd.anchor_token_id), -1 when it has none; -2 on error.
// Read with the gguf API on metadata only (no_alloc: the tensors are not loaded again).
int32_t read_anchor(const std::string & path, std::string * err) {
    gguf_init_params gp = { /*.no_alloc =*/ true, /*.ctx =*/ nullptr };
    gguf_context * g = gguf_init_from_file(path.c_str(), gp);
    if (g == nullptr) {
        *err = "cannot read " + path + " as a GGUF file";
        return -2;
    }
    int32_t anchor = -1;
    const int64_t key = gguf_find_key(g, "pyactadd.anchor_token_id");
    if (key >= 0) {
        if (gguf_get_kv_type(g, key) == GGUF_TYPE_INT32) {
            anchor = gguf_get_val_i32(g, key);
        } else {
            *err = path + ": pyactadd.anchor_token_id is not an INT32";
            anchor = -2;
        }
    }
    gguf_free(g);
    if (anchor < -1) {
        if (err->empty()) {
            *err = path + ": invalid anchor token id " + std::to_string(anchor);
        }
        return -2;
    }
    return anchor;
}

// llama.cpp logs to stderr by default; keep stderr for errors only.
void log_errors_only(ggml_log_level level, const char * text, void * /*user_data*/) {
    if (level == GGML_LOG_LEVEL_ERROR) {
        std::fputs(text, stderr);
    }
}

struct backend_guard {
    backend_guard() { llama_backend_init(); }
    ~backend_guard() { llama_backend_free(); }
};
struct model_deleter {
    void operator()(llama_model * m) const { llama_model_free(m); }
};
struct engine_deleter {
    void operator()(pyactadd_engine * e) const { pyactadd_engine_free(e); }
};
struct context_deleter {
    void operator()(llama_context * c) const { llama_free(c); }
};
struct sampler_deleter {
    void operator()(llama_sampler * s) const { llama_sampler_free(s); }
};

} // namespace

int main(int argc, char ** argv) {
    options opt;
    if (parse_args(argc, argv, &opt) != 0) {
        return 1;
    }

    // Every owner below is declared in creation order, so leaving main (on success or on
    // any error) frees in reverse: sampler, context, then the engine the context calls
    // into, then the model, then the backend.
    llama_log_set(log_errors_only, nullptr);
    backend_guard backend;

    // --- load the model ---------------------------------------------------------------
    llama_model_params mparams = llama_model_default_params();
    std::unique_ptr<llama_model, model_deleter> model(llama_model_load_from_file(opt.model.c_str(), mparams));
    if (!model) {
        std::fprintf(stderr, "steer: error: unable to load model '%s'\n", opt.model.c_str());
        return 1;
    }
    const llama_vocab * vocab = llama_model_get_vocab(model.get());

    // --- create the engine for this model and load the steering files -------------------
    pyactadd_engine_params eparams = pyactadd_engine_default_params();
    eparams.n_embd = llama_model_n_embd(model.get());
    eparams.n_layer = llama_model_n_layer(model.get());
    std::unique_ptr<pyactadd_engine, engine_deleter> engine(pyactadd_engine_create(eparams));
    if (!engine) {
        std::fprintf(stderr, "steer: error: cannot create a steering engine for n_embd=%d, n_layer=%d\n", eparams.n_embd,
                     eparams.n_layer);
        return 1;
    }
    int32_t anchor = -1;
    for (const steer_file & f : opt.files) {
        if (pyactadd_engine_load_file(engine.get(), f.path.c_str(), f.coeff) < 0) {
            std::fprintf(stderr, "steer: error: %s\n", pyactadd_engine_last_error(engine.get()));
            return 1;
        }
        std::string err;
        const int32_t a = read_anchor(f.path, &err);
        if (a == -2) {
            std::fprintf(stderr, "steer: error: %s\n", err.c_str());
            return 1;
        }
        if (a >= 0 && anchor >= 0 && a != anchor) {
            std::fprintf(stderr, "steer: error: the steering files use different anchor tokens (%d, %d): extract them with one --anchor\n",
                         anchor, a);
            return 1;
        }
        anchor = a >= 0 ? a : anchor;
    }
    if (anchor >= llama_vocab_n_tokens(vocab)) {
        std::fprintf(stderr, "steer: error: anchor token %d is not in this model's vocabulary of %d tokens\n", anchor,
                     llama_vocab_n_tokens(vocab));
        return 1;
    }

    // --- tokenize the prompt exactly as pyactadd does ------------------------------------
    // add_special: BOS where the model asks for one; parse_special: "<|im_start|>" becomes
    // the special token. Same as llama-cpp-python's tokenize(add_bos=True, special=True).
    const int n_max = -llama_tokenize(vocab, opt.prompt.c_str(), (int32_t) opt.prompt.size(), nullptr, 0, true, true);
    if (n_max <= 0) {
        std::fprintf(stderr, "steer: error: failed to tokenize the prompt\n");
        return 1;
    }
    std::vector<llama_token> tokens(n_max);
    if (llama_tokenize(vocab, opt.prompt.c_str(), (int32_t) opt.prompt.size(), tokens.data(), n_max, true, true) < 0) {
        std::fprintf(stderr, "steer: error: failed to tokenize the prompt\n");
        return 1;
    }
    // The rows of an anchored file were extracted with the anchor at position 0.
    if (anchor >= 0 && tokens.front() != anchor) {
        tokens.insert(tokens.begin(), anchor);
    }
    const int n_prompt = (int) tokens.size();
    if (n_prompt + opt.n_predict > opt.n_ctx) {
        std::fprintf(stderr, "steer: error: prompt (%d tokens) plus -n %d exceeds the context of %d: raise -c or lower -n\n",
                     n_prompt, opt.n_predict, opt.n_ctx);
        return 1;
    }

    // --- create the context with the engine attached -------------------------------------
    // The settings below are llama-cpp-python's (as pyactadd run uses it), so the greedy
    // text matches pyactadd's: flash attention off (its default; llama.cpp's "auto"
    // would turn it on and round differently), micro-batches of 512, and the thread
    // counts pyactadd asks for (-t / --threads sets only the generation threads there).
    const int n_cores = (int) std::max(1u, std::thread::hardware_concurrency());
    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = (uint32_t) opt.n_ctx;
    cparams.n_batch = (uint32_t) n_prompt; // the whole prompt in one llama_decode
    cparams.n_ubatch = 512;
    cparams.n_threads = opt.n_threads > 0 ? opt.n_threads : std::min(n_cores, 8);
    cparams.n_threads_batch = n_cores;
    cparams.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cparams.no_perf = true;
    // --no-steer still read the files above, so both runs see the same prompt tokens
    // (anchor included) and differ only by the steering, like pyactadd run --compare.
    if (!opt.no_steer && pyactadd_engine_attach(engine.get(), &cparams) != 0) {
        std::fprintf(stderr, "steer: error: %s\n", pyactadd_engine_last_error(engine.get()));
        return 1;
    }
    std::unique_ptr<llama_context, context_deleter> ctx(llama_init_from_model(model.get(), cparams));
    if (!ctx) {
        std::fprintf(stderr, "steer: error: failed to create the llama_context\n");
        return 1;
    }

    // --- greedy sampler --------------------------------------------------------------------
    llama_sampler_chain_params sparams = llama_sampler_chain_default_params();
    sparams.no_perf = true;
    std::unique_ptr<llama_sampler, sampler_deleter> smpl(llama_sampler_chain_init(sparams));
    if (!smpl) {
        std::fprintf(stderr, "steer: error: failed to create the sampler\n");
        return 1;
    }
    llama_sampler_chain_add(smpl.get(), llama_sampler_init_greedy());

    // --- decode the prompt as one batch, then generate -------------------------------------
    // The engine adds each steering row while llama.cpp computes the prompt's layer
    // outputs; generated tokens lie past the steered span (for front-aligned files shorter
    // than the prompt) and run unsteered at full speed.
    llama_batch batch = llama_batch_get_one(tokens.data(), n_prompt);
    std::vector<char> piece(256);
    for (int n_decoded = 0; n_decoded < opt.n_predict; ++n_decoded) {
        if (llama_decode(ctx.get(), batch) != 0) {
            std::fprintf(stderr, "steer: error: llama_decode failed\n");
            return 1;
        }
        llama_token id = llama_sampler_sample(smpl.get(), ctx.get(), -1);
        if (llama_vocab_is_eog(vocab, id)) {
            break;
        }
        // special=false: control tokens print as nothing, as in llama-cpp-python's text.
        int n = llama_token_to_piece(vocab, id, piece.data(), (int32_t) piece.size(), 0, false);
        if (n < 0) {
            piece.resize(-n);
            n = llama_token_to_piece(vocab, id, piece.data(), (int32_t) piece.size(), 0, false);
        }
        if (n < 0) {
            std::fprintf(stderr, "steer: error: failed to convert token %d to text\n", id);
            return 1;
        }
        std::fwrite(piece.data(), 1, n, stdout);
        std::fflush(stdout);
        // The last token is printed but not decoded: nothing would read its logits.
        if (n_decoded + 1 < opt.n_predict) {
            batch = llama_batch_get_one(&id, 1);
        }
    }

    // A skipped tensor means the text was not steered as asked: say so and fail.
    const pyactadd_engine_stats stats = pyactadd_engine_get_stats(engine.get());
    if (stats.n_errors > 0) {
        std::fprintf(stderr, "steer: error: the engine skipped %llu tensor(s): %s\n", (unsigned long long) stats.n_errors,
                     pyactadd_engine_last_error(engine.get()));
        return 1;
    }
    return 0;
}
