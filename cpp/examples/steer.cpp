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
// (tests/cpp/test_c_api.py checks that). Build it with CMake (-DPYACTADD_BUILD_EXAMPLES=ON)
// or against an installed pyactadd:
//
//     c++ steer.cpp $(pyactadd config --cflags --libs) -o pyactadd-steer
//
// Output: stdout holds exactly the generated text (no prompt, no trailing newline), so
// scripts can compare it byte for byte. Errors: one "steer: error: ..." line on stderr
// and exit code 1.
//
// Anchors: a file extracted with `--anchor TOKEN` records that token, and its rows
// assume it sits at position 0; pyactadd_file_read_info() reports it. Like
// `pyactadd run`, this program prepends it to the prompt tokens unless they already
// start with it; files with different anchors cannot be combined.
//
// The engine is given the model, so a file made for another model (its fingerprint:
// architecture, n_embd, n_layer, vocabulary size) is refused, as `pyactadd run` refuses it.
//
// Not handled here: "back"-aligned files (the engine's loader refuses them because the
// offset depends on the prompt length; an application adds their rows itself with
// pyactadd_engine_add(..., offset = n_prompt - n_rows, ...)), and chat templates.

#include "pyactadd.h"

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

// Options that take a value: argv[*i] is the option, argv[*i + 1] its value (checked
// to exist). Returns 0, 1 after printing why the value is bad, or -1 for another option.
int parse_value_option(char ** argv, int * i, options * opt) {
    const char * a = argv[*i];
    const char * v = argv[*i + 1];
    struct int_option {
        const char * name;
        int min;
        int * out;
    };
    const int_option ints[] = { { "-n", 1, &opt->n_predict }, { "-c", 16, &opt->n_ctx }, { "-t", 1, &opt->n_threads } };
    for (const int_option & o : ints) {
        if (std::strcmp(a, o.name) == 0) {
            ++*i;
            if (!parse_int(v, o.min, o.out)) {
                std::fprintf(stderr, "steer: error: %s wants a whole number >= %d, got '%s'\n", a, o.min, v);
                return 1;
            }
            return 0;
        }
    }
    if (std::strcmp(a, "-s") == 0) {
        ++*i;
        steer_file f;
        if (!parse_steer(v, &f)) {
            std::fprintf(stderr, "steer: error: the coefficient in '%s' must be a finite number\n", v);
            return 1;
        }
        opt->files.push_back(f);
        return 0;
    }
    if (std::strcmp(a, "-m") == 0) {
        opt->model = argv[++*i];
        return 0;
    }
    if (std::strcmp(a, "-p") == 0) {
        opt->prompt = argv[++*i];
        return 0;
    }
    return -1;
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
        } else if (!takes_value) {
            std::fprintf(stderr, "steer: error: unknown argument '%s'\n", a);
            return 1;
        } else if (parse_value_option(argv, &i, opt) != 0) {
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

using model_ptr = std::unique_ptr<llama_model, model_deleter>;
using engine_ptr = std::unique_ptr<pyactadd_engine, engine_deleter>;
using context_ptr = std::unique_ptr<llama_context, context_deleter>;
using sampler_ptr = std::unique_ptr<llama_sampler, sampler_deleter>;

// --- phase 1: the model ------------------------------------------------------------------
model_ptr load_model(const options & opt) {
    llama_model_params mparams = llama_model_default_params();
    model_ptr model(llama_model_load_from_file(opt.model.c_str(), mparams));
    if (!model) {
        std::fprintf(stderr, "steer: error: unable to load model '%s'\n", opt.model.c_str());
    }
    return model;
}

// --- phase 2: the engine for this model, with the steering files loaded -------------------
// Given the model, the engine takes its sizes from it and refuses a file made for another
// model. Sets *anchor to the files' anchor token, or -1 when none has one.
engine_ptr load_steering(const llama_model * model, const options & opt, llama_token * anchor) {
    pyactadd_engine_params eparams = pyactadd_engine_default_params();
    eparams.model = model;
    engine_ptr engine(pyactadd_engine_create(eparams));
    if (!engine) {
        std::fprintf(stderr, "steer: error: cannot create a steering engine for this model (n_embd=%d, n_layer=%d)\n",
                     llama_model_n_embd(model), llama_model_n_layer(model));
        return nullptr;
    }
    *anchor = -1;
    for (const steer_file & f : opt.files) {
        // What the file says about itself; the engine reads and checks it the same way.
        pyactadd_file_info info;
        if (pyactadd_file_read_info(f.path.c_str(), &info) != 0) {
            std::fprintf(stderr, "steer: error: %s\n", info.error);
            return nullptr;
        }
        if (pyactadd_engine_load_file(engine.get(), f.path.c_str(), f.coeff) < 0) {
            std::fprintf(stderr, "steer: error: %s\n", pyactadd_engine_last_error(engine.get()));
            return nullptr;
        }
        if (info.anchor_token_id >= 0 && *anchor >= 0 && info.anchor_token_id != *anchor) {
            std::fprintf(stderr, "steer: error: the steering files use different anchor tokens (%d, %d): extract them with one --anchor\n",
                         *anchor, info.anchor_token_id);
            return nullptr;
        }
        *anchor = info.anchor_token_id >= 0 ? info.anchor_token_id : *anchor;
    }
    return engine;
}

// --- phase 3: the prompt tokens, exactly as pyactadd makes them ----------------------------
// add_special: BOS where the model asks for one; parse_special: "<|im_start|>" becomes
// the special token. Same as llama-cpp-python's tokenize(add_bos=True, special=True).
// The rows of an anchored file were extracted with the anchor at position 0.
bool tokenize_prompt(const llama_vocab * vocab, const options & opt, llama_token anchor, std::vector<llama_token> * tokens) {
    if (anchor >= llama_vocab_n_tokens(vocab)) {
        std::fprintf(stderr, "steer: error: anchor token %d is not in this model's vocabulary of %d tokens\n", anchor,
                     llama_vocab_n_tokens(vocab));
        return false;
    }
    const char * text = opt.prompt.c_str();
    const int32_t n_text = (int32_t) opt.prompt.size();
    const int n_max = -llama_tokenize(vocab, text, n_text, nullptr, 0, true, true);
    tokens->resize(n_max > 0 ? n_max : 0);
    if (n_max <= 0 || llama_tokenize(vocab, text, n_text, tokens->data(), n_max, true, true) < 0) {
        std::fprintf(stderr, "steer: error: failed to tokenize the prompt\n");
        return false;
    }
    if (anchor >= 0 && tokens->front() != anchor) {
        tokens->insert(tokens->begin(), anchor);
    }
    const int n_prompt = (int) tokens->size();
    if (n_prompt + opt.n_predict > opt.n_ctx) {
        std::fprintf(stderr, "steer: error: prompt (%d tokens) plus -n %d exceeds the context of %d: raise -c or lower -n\n",
                     n_prompt, opt.n_predict, opt.n_ctx);
        return false;
    }
    return true;
}

// --- phase 4: the context, with the engine attached -----------------------------------------
// The settings below are llama-cpp-python's (as pyactadd run uses it), so the greedy
// text matches pyactadd's: flash attention off (its default; llama.cpp's "auto"
// would turn it on and round differently), micro-batches of 512, and the thread
// counts pyactadd asks for (-t / --threads sets only the generation threads there).
context_ptr create_context(llama_model * model, pyactadd_engine * engine, const options & opt, int n_prompt) {
    const int n_cores = (int) std::max(1u, std::thread::hardware_concurrency());
    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = (uint32_t) opt.n_ctx;
    cparams.n_batch = (uint32_t) n_prompt; // the whole prompt in one llama_decode
    cparams.n_ubatch = 512;
    cparams.n_threads = opt.n_threads > 0 ? opt.n_threads : std::min(n_cores, 8);
    cparams.n_threads_batch = n_cores;
    cparams.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cparams.no_perf = true;
    // --no-steer still read the files, so both runs see the same prompt tokens (anchor
    // included) and differ only by the steering, like pyactadd run --compare.
    if (!opt.no_steer && pyactadd_engine_attach(engine, &cparams) != 0) {
        std::fprintf(stderr, "steer: error: %s\n", pyactadd_engine_last_error(engine));
        return nullptr;
    }
    context_ptr ctx(llama_init_from_model(model, cparams));
    if (!ctx) {
        std::fprintf(stderr, "steer: error: failed to create the llama_context\n");
    }
    return ctx;
}

// --- phase 5: a greedy sampler ---------------------------------------------------------------
sampler_ptr create_sampler() {
    llama_sampler_chain_params sparams = llama_sampler_chain_default_params();
    sparams.no_perf = true;
    sampler_ptr smpl(llama_sampler_chain_init(sparams));
    if (!smpl) {
        std::fprintf(stderr, "steer: error: failed to create the sampler\n");
        return nullptr;
    }
    llama_sampler_chain_add(smpl.get(), llama_sampler_init_greedy());
    return smpl;
}

// Writes a token's text to stdout. special=false: control tokens print as nothing, as
// in llama-cpp-python's text.
bool print_token(const llama_vocab * vocab, llama_token id, std::vector<char> * piece) {
    int n = llama_token_to_piece(vocab, id, piece->data(), (int32_t) piece->size(), 0, false);
    if (n < 0) {
        piece->resize(-n);
        n = llama_token_to_piece(vocab, id, piece->data(), (int32_t) piece->size(), 0, false);
    }
    if (n < 0) {
        std::fprintf(stderr, "steer: error: failed to convert token %d to text\n", id);
        return false;
    }
    std::fwrite(piece->data(), 1, n, stdout);
    std::fflush(stdout);
    return true;
}

// --- phase 6: decode the prompt as one batch, then generate -----------------------------------
// The engine adds each steering row while llama.cpp computes the prompt's layer outputs;
// generated tokens lie past the steered span (for front-aligned files shorter than the
// prompt) and run unsteered at full speed.
bool generate(llama_context * ctx, llama_sampler * smpl, const llama_vocab * vocab, std::vector<llama_token> & tokens,
              int n_predict) {
    llama_batch batch = llama_batch_get_one(tokens.data(), (int32_t) tokens.size());
    std::vector<char> piece(256);
    for (int n_decoded = 0; n_decoded < n_predict; ++n_decoded) {
        if (llama_decode(ctx, batch) != 0) {
            std::fprintf(stderr, "steer: error: llama_decode failed\n");
            return false;
        }
        llama_token id = llama_sampler_sample(smpl, ctx, -1);
        if (llama_vocab_is_eog(vocab, id)) {
            break;
        }
        if (!print_token(vocab, id, &piece)) {
            return false;
        }
        // The last token is printed but not decoded: nothing would read its logits.
        if (n_decoded + 1 < n_predict) {
            batch = llama_batch_get_one(&id, 1);
        }
    }
    return true;
}

// --- phase 7: a skipped tensor means the text was not steered as asked: say so and fail ------
bool engine_had_no_errors(const pyactadd_engine * engine) {
    const pyactadd_engine_stats stats = pyactadd_engine_get_stats(engine);
    if (stats.n_errors > 0) {
        std::fprintf(stderr, "steer: error: the engine skipped %llu tensor(s): %s\n", (unsigned long long) stats.n_errors,
                     pyactadd_engine_last_error(engine));
        return false;
    }
    return true;
}

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
    model_ptr model = load_model(opt);
    if (!model) {
        return 1;
    }
    const llama_vocab * vocab = llama_model_get_vocab(model.get());
    llama_token anchor = -1;
    engine_ptr engine = load_steering(model.get(), opt, &anchor);
    std::vector<llama_token> tokens;
    if (!engine || !tokenize_prompt(vocab, opt, anchor, &tokens)) {
        return 1;
    }
    context_ptr ctx = create_context(model.get(), engine.get(), opt, (int) tokens.size());
    if (!ctx) {
        return 1;
    }
    sampler_ptr smpl = create_sampler();
    if (!smpl || !generate(ctx.get(), smpl.get(), vocab, tokens, opt.n_predict)) {
        return 1;
    }
    return engine_had_no_errors(engine.get()) ? 0 : 1;
}
