from mpitpi.cli import main

raise SystemExit(main())
