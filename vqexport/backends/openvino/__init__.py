"""OpenVINO target: the portable graph converted to OpenVINO IR, optionally int8-weight-compressed with NNCF. openvino
and nncf are imported lazily."""
