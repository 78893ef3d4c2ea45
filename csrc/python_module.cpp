// The Python extension pege_kernels._C: a module with no functions, whose
// import runs the op registrations of pege_ops.cpp.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
