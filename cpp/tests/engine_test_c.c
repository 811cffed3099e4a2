/* engine_test_c.c: the part of engine_test written in C.
 *
 * pyactadd.h is a C API, so this file proves the header compiles as C11 (with
 * -pedantic in the test build) and that a C caller can do what C++ cannot do without
 * undefined behaviour: pass an int that is not one of the enum's values, which the
 * engine must refuse with -1 (a C++ test would trip UBSan's enum check itself). */

#include "pyactadd.h"

int32_t engine_test_c_add_raw_align(pyactadd_engine * engine, int32_t il, const float * data, int32_t n_rows, int32_t n_embd,
                                    int32_t offset, int align) {
    return pyactadd_engine_add(engine, il, data, n_rows, n_embd, offset, (enum pyactadd_align) align);
}

/* The header's "typical use", minus the model: returns 0 when every step behaves. */
int engine_test_c_smoke(void) {
    struct pyactadd_engine_params ep = pyactadd_engine_default_params();
    float row[4] = { 1.0f, 2.0f, 3.0f, 4.0f };
    struct llama_context_params cp = llama_context_default_params();
    pyactadd_engine * eng;
    int ok = 1;

    ep.n_embd = 4;
    ep.n_layer = 3;
    eng = pyactadd_engine_create(ep);
    if (eng == NULL) {
        return 1;
    }
    ok = ok && pyactadd_engine_add(eng, 1, row, 1, 4, 0, PYACTADD_ALIGN_ALL) == 0;
    ok = ok && pyactadd_engine_count(eng) == 1;
    ok = ok && pyactadd_engine_attach(eng, &cp) == 0;
    ok = ok && cp.cb_eval == pyactadd_engine_eval_callback && cp.cb_eval_user_data == (void *) eng;
    pyactadd_engine_free(eng);
    return ok ? 0 : 1;
}
