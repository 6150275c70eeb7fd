import sys

from tistudio.cli import main

sys.exit(main())
