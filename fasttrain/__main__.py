import sys
from fasttrain.cli.main import main

sys.exit(main())
