"""`python -m actstore` runs the CLI."""

import sys

from actstore.cli import main

sys.exit(main())
