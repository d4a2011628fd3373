"""Code from a folder that is not on sys.path, in workers, with reload (audience: scripts that load
their classes from a folder named in a config, notebooks that edit a package while it runs).

Run: python examples/python/code_from_folder.py

The package `geometry` lives in examples/python/plugins/. The example copies it to a temporary
folder (it edits the copy to show reload), imports it with ringpool.import_module_from_path, and
runs its functions in Executor workers, which never see the folder: ringpool ships them the
sources from memory.
"""
import os
import shutil
import sys
import tempfile

import ringpool

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "geometry")
        shutil.copytree(os.path.join(HERE, "plugins", "geometry"), folder)

        geometry = ringpool.import_module_from_path("geometry", folder)
        assert folder not in sys.path and tmp not in sys.path
        with ringpool.Executor(max_workers=2, preload=["geometry"]) as ex:
            area, version, pid = ex.submit(geometry.area_of, geometry.Square(3)).result(timeout=60)
            print(f"version {version}: area {area} (worker pid {pid}, parent {os.getpid()})")

            # Edit the code, as you would in an editor, then reload: workers get the new version
            # before their next task.
            init = os.path.join(folder, "__init__.py")
            with open(init) as f:
                text = f.read()
            with open(init, "w") as f:
                f.write(text.replace("VERSION = 1", "VERSION = 2"))
            geometry = ringpool.reload("geometry")
            area, version, _ = ex.submit(geometry.area_of, geometry.Square(4)).result(timeout=60)
            print(f"version {version}: area {area} after reload")

        shutil.rmtree(folder)  # the workers no longer need the folder: they import from memory
        with ringpool.Executor(max_workers=1) as ex:
            area, version, _ = ex.submit(geometry.area_of, geometry.Square(5)).result(timeout=60)
            print(f"version {version}: area {area} with the folder deleted")


if __name__ == "__main__":
    main()
