"""Run inside the rebuilt serving Python (``python -I -S serving_env_child.py spec.json``): load
every python-backend model of each repository through the Triton stand-in, run one encoded image
through the ensembles whose every step is a python-backend model, and import every module of
``python_backend``.  Prints one JSON line: {"failures": [...], "cuda_only": [...], "ran": [...]}.

Only the standard library is imported before the spec's site folder is on sys.path, so every
third-party import below comes from that folder.
"""
import importlib
import importlib.util
import json
import pkgutil
import site
import sys
import traceback


def _error(e: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(e), e)).strip()


def _load(path: str, args: dict):
    spec = importlib.util.spec_from_file_location(f"served_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    instance = module.TritonPythonModel()
    instance.initialize(args)
    return instance


def _run_ensemble(fake, np, steps: list, instances: dict, image: bytes) -> list:
    """One encoded image through the ensemble's steps, each output feeding the steps after it."""
    # a copy: frombuffer's array is read-only, which numpy 2 refuses to export through DLPack
    # (Triton's own input tensors are writable)
    tensors = {"image": np.frombuffer(image, np.uint8)[None].copy()}
    for step in steps:
        inputs = {model_input: tensors[tensor] for model_input, tensor in step["input_map"].items()}
        (response,) = instances[step["model"]].execute([fake.Request(**inputs)])
        if response.has_error():
            raise RuntimeError(f"{step['model']}: {response.error().message()}")
        for model_output, tensor in step["output_map"].items():
            tensors[tensor] = response.output(model_output)
    return sorted(tensors)


def main(spec_file: str) -> None:
    spec = json.loads(open(spec_file).read())
    site.addsitedir(spec["site"])
    site.addsitedir(spec["stub"])  # triton_fake, standing in for the stub's triton_python_backend_utils
    result = {"failures": [], "cuda_only": [], "ran": []}
    try:
        import numpy as np
        import triton_fake as fake
    except Exception as e:  # noqa: BLE001 - reported, not raised
        result["failures"].append(f"the stand-in does not import: {_error(e)}")
        print(json.dumps(result))
        return
    sys.modules["triton_python_backend_utils"] = fake.pb_utils_module()

    for repo in spec["repositories"]:
        instances = {}
        for model in repo["models"]:
            try:
                instances[model["name"]] = _load(model["model_py"], model["args"])
            except Exception as e:  # noqa: BLE001
                result["failures"].append(f"{repo['target']}/{model['name']}: {_error(e)}")
        if repo["steps"] and all(step["model"] in instances for step in repo["steps"]):
            try:
                names = _run_ensemble(fake, np, repo["steps"], instances, open(spec["image"], "rb").read())
                result["ran"].append(f"{repo['target']}: {', '.join(names)}")
            except Exception as e:  # noqa: BLE001
                result["failures"].append(f"{repo['target']} ensemble: {_error(e)}")

    import python_backend

    for info in pkgutil.walk_packages(python_backend.__path__, "python_backend."):
        if info.name.startswith("python_backend.triton_models."):
            continue  # the model.py adapters, loaded above
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as e:
            if e.name is not None and e.name.split(".")[0] in spec["cuda_only_modules"]:
                result["cuda_only"].append(f"{info.name} (needs {e.name})")
            else:
                result["failures"].append(f"import {info.name}: {_error(e)}")
        except Exception as e:  # noqa: BLE001
            result["failures"].append(f"import {info.name}: {_error(e)}")
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
