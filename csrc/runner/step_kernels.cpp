// The C++ runner's copy of the CPU step kernels (csrc/cpu/step.cpp), compiled into cg_fast._runner without
// the operator registration (cg_fast._C registers them; registering twice is an error). A separate file, so
// that its object never takes the place of cg_fast._C's in a shared build folder.
#define CG_FAST_STEP_NO_REGISTER 1
#include "../cpu/step.cpp"
