#!/usr/bin/env python3
# SPDX-License-Identifier: BSD-3-Clause
"""Checks the Spack recipe without Spack (not installable here): packaging/spack's
package.py parses as Python, declares the variants the docs promise (cuda through
CudaPackage), and every KMOE_* option it passes to CMake is one CMakeLists.txt declares.
Exits 1 with a message per failure."""
import ast
import pathlib
import re
import sys

root = pathlib.Path(__file__).resolve().parent.parent
recipe = root / "packaging/spack/packages/kmoe/package.py"
tree = ast.parse(recipe.read_text(), filename=str(recipe))
failures = []

classes = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Kmoe"]
if len(classes) != 1:
    sys.exit(f"{recipe}: expected one class Kmoe")
recipe_class = classes[0]
bases = {b.id for b in recipe_class.bases if isinstance(b, ast.Name)}
for base in ("CMakePackage", "CudaPackage"):
    if base not in bases:
        failures.append(f"class Kmoe does not derive from {base}")


def calls(name):
    return [n for n in ast.walk(recipe_class)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == name]


def first_string(call):
    arg = call.args[0] if call.args else None
    return arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None


variants = {first_string(c) for c in calls("variant")}
for wanted in ("mpi", "nccl", "io"):
    if wanted not in variants:
        failures.append(f"no variant('{wanted}')")

cmake_options = set(re.findall(r"option\((KMOE_\w+)", (root / "CMakeLists.txt").read_text()))
for call in calls("define_from_variant"):
    option, variant = first_string(call), call.args[1].value
    if option not in cmake_options:
        failures.append(f"define_from_variant('{option}'): CMakeLists.txt declares no such option")
    if variant not in variants:
        failures.append(f"define_from_variant(..., '{variant}'): no such variant")
for call in calls("define"):
    option = first_string(call)
    if option and option.startswith("KMOE_") and option not in cmake_options:
        failures.append(f"define('{option}'): CMakeLists.txt declares no such option")

for failure in failures:
    print(f"[check_packaging] {recipe.relative_to(root)}: {failure}", file=sys.stderr)
if failures:
    sys.exit(1)
print(f"[check_packaging] OK: Spack recipe parses; variants {sorted(variants)} + cuda")
