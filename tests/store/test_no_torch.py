import subprocess
import sys


def test_adapters_store_imports_no_torch():
    code = ("import sys, adapters_store.version_store, adapters_store.ingest, adapters_store.materialise, "
            "adapters_store.backends, adapters_store.compeft; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
