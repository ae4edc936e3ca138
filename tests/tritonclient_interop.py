"""Run by the tests in a subprocess: tritonclient registers its own `inference.*` protobuf messages, which
clash with serving.proto's in one process. Talks to a server with the unmodified tritonclient.grpc
client and prints one JSON object with what it saw.

    python tritonclient_interop.py infer TARGET IMAGES.npy    metadata, readiness, one inference
    python tritonclient_interop.py statistics TARGET          get_inference_statistics for every model
"""

import json
import sys

import numpy as np
import tritonclient.grpc as triton


def main(target: str, images_path: str) -> None:
    images = np.load(images_path)  # uint8 [N, 1, 28, 28]
    client = triton.InferenceServerClient(target)
    metadata = client.get_model_metadata("mnist", as_json=True)
    server = client.get_server_metadata(as_json=True)
    tensor = triton.InferInput("images", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    result = client.infer("mnist", [tensor], outputs=[triton.InferRequestedOutput("probabilities")])
    try:
        client.infer("no-such-model", [tensor])
        missing = "no error"
    except triton.InferenceServerException as e:
        missing = e.status()
    print(
        json.dumps(
            {
                "live": client.is_server_live(),
                "ready": client.is_server_ready(),
                "model_ready": client.is_model_ready("mnist"),
                "server": server,
                "metadata": metadata,
                "version": result.get_response().model_version,
                "probabilities": result.as_numpy("probabilities").tolist(),
                "missing_model_status": missing,
            }
        )
    )


def statistics(target: str) -> None:
    client = triton.InferenceServerClient(target)
    print(json.dumps(client.get_inference_statistics(as_json=True)))


if __name__ == "__main__":
    if sys.argv[1] == "infer":
        main(sys.argv[2], sys.argv[3])
    else:
        statistics(sys.argv[2])
