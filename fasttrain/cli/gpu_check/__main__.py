import sys

from fasttrain.cli.gpu_check.runner import main

sys.exit(main())
