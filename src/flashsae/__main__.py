from flashsae.cli import main

raise SystemExit(main())
