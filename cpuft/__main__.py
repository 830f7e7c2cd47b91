from cpuft.cli import main

raise SystemExit(main())
