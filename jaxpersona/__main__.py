import sys

from jaxpersona.cli import main

sys.exit(main())
