"""Runs the code blocks of documentation pages for tests/test_docs.py, in one process so torch and
transformers are imported once: ``python doc_runner.py plan.json results.json``.

The plan lists pages, each with a working folder and its steps in page order: Python blocks run
with ``exec`` in a namespace of their own per page (so a page cannot use what another defined),
bash commands in a shell. Between pages Dynamo is reset and patterns a page registered are
removed, as if each page ran in a fresh interpreter. The results hold, per page, what each
Python block printed and the first error, if any."""
import contextlib
import io
import json
import os
import subprocess
import sys
import traceback
import types

import collector  # tests/collector.py (this script's folder is on sys.path)


def _shell_env() -> dict:
    """The environment of bash steps: the scripts of the interpreter running the tests come
    first on PATH (``fastlora`` is this installation's, even when its venv is not activated)."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def run_page(page: dict) -> dict:
    import torch

    import fastlora

    os.chdir(page["dir"])
    torch._dynamo.reset()
    # a real module per page: Dynamo looks globals up through sys.modules[__name__]
    module = types.ModuleType("doc_page_" + "".join(c if c.isalnum() else "_" for c in
                                                     page["page"]))
    sys.modules[module.__name__] = module
    namespace, outputs = module.__dict__, {}
    try:
        for step in page["steps"]:
            if step["kind"] == "bash":
                proc = subprocess.run(step["code"], shell=True, executable="/bin/bash",
                                      capture_output=True, text=True, env=_shell_env())
                if proc.returncode:
                    return {"outputs": outputs, "error": f"{step['name']}: {step['code']} "
                                                         f"failed ({proc.returncode}):\n"
                                                         f"{proc.stderr[-3000:]}"}
                continue
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                exec(compile(step["code"], step["name"], "exec"), namespace)
            outputs[str(step["index"])] = printed.getvalue()
    except BaseException:
        return {"outputs": outputs, "error": traceback.format_exc()[-4000:]}
    finally:
        for pattern in fastlora.registered_patterns():
            if not pattern.builtin:
                fastlora.unregister_pattern(pattern.name)
    return {"outputs": outputs, "error": None}


def main(plan_file: str, results_file: str) -> None:
    collector.collect_less_often()
    with open(plan_file) as f:
        plan = json.load(f)
    results = {page["page"]: run_page(page) for page in plan}
    with open(results_file, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
