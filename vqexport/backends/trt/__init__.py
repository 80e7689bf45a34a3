"""TensorRT target: readiness check (CPU), engine build, runner, plugin for the fused head. tensorrt is imported lazily."""
