from graphpass.cli.main import main

raise SystemExit(main())
