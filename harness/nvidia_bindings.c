/* The nine functions TensorRT's Python bindings (tensorrt_bindings/tensorrt.so) take from TensorRT's
   libraries, each answering null or 0: compiled as libnvinfer.so.<major>, libnvonnxparser.so.<major>
   and libnvinfer_plugin.so.<major> (harness/nvidia_bindings.py), they let the bindings import where
   TensorRT is not installed, so that their classes, methods and enums can be read. Nothing can run
   over them: trt.Builder(logger) raises, its factory having returned null. */

#include <stddef.h>

void *createInferBuilder_INTERNAL(void *logger, int version) { return NULL; }
void *createInferRefitter_INTERNAL(void *engine, void *logger, int version) { return NULL; }
void *createInferRuntime_INTERNAL(void *logger, int version) { return NULL; }
void *createNvOnnxParser_INTERNAL(void *network, void *logger, int version) { return NULL; }
void *createNvOnnxParserRefitter_INTERNAL(void *refitter, void *logger, int version) { return NULL; }
int getNvOnnxParserVersion(void) { return 0; }
void *getPluginRegistry(void) { return NULL; }
void *getBuilderPluginRegistry(int capability) { return NULL; }
int initLibNvInferPlugins(void *logger, const char *namespace_) { return 0; }
