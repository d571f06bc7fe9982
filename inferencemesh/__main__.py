from inferencemesh.cli.main import main

raise SystemExit(main())
